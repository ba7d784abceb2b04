-- name: memory_gb_hours
-- version: 1
-- window: 1h
-- lateness: 5m
-- currency: USD
-- description: Allocated memory, 0.0045 USD per GB-hour (GB = 10^9 bytes), i.e. 1.25e-15 USD per byte-second.
SELECT entity_id,
       'gb_hour' AS unit,
       CAST(SUM(memory_byte_seconds) AS DECIMAL(38, 3)) / 3600000000000 AS quantity,
       0.0045 AS unit_price,
       CAST(SUM(memory_byte_seconds) AS DECIMAL(38, 3)) * 0.00000000000000125 AS amount
FROM usage
GROUP BY entity_id
