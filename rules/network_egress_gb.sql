-- name: network_egress_gb
-- version: 1
-- window: 1h
-- lateness: 5m
-- currency: USD
-- description: Bytes sent by instances, 0.09 USD per GB (10^9 bytes).
SELECT entity_id,
       'gb' AS unit,
       CAST(SUM(net_tx_bytes) AS DECIMAL(38, 0)) / 1000000000 AS quantity,
       0.09 AS unit_price,
       CAST(SUM(net_tx_bytes) AS DECIMAL(38, 0)) * 0.00000000009 AS amount
FROM usage
WHERE net_tx_bytes > 0
GROUP BY entity_id
