-- name: package
-- version: 1
-- window: 1d
-- lateness: 5m
-- currency: USD
-- description: Package pricing: egress sold in packages of 100 GB at 5.00 USD each; a
-- description: started package is a whole package. Integer arithmetic, no rounding.
WITH q AS (
  SELECT entity_id, CAST(SUM(net_tx_bytes) AS BIGINT) AS bytes FROM usage GROUP BY entity_id
)
SELECT entity_id,
       'package_100gb' AS unit,
       (bytes + 99999999999) / 100000000000 AS quantity,
       5.00 AS unit_price,
       (bytes + 99999999999) / 100000000000 * 5.00 AS amount
FROM q
WHERE bytes > 0
