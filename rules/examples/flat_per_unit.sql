-- name: flat_per_unit
-- version: 1
-- window: 1h
-- lateness: 5m
-- currency: USD
-- description: Flat price per unit: every vCPU-hour at 0.036 USD.
SELECT entity_id,
       'vcpu_hour' AS unit,
       SUM(vcpu_seconds) / 3600 AS quantity,
       0.036 AS unit_price,
       SUM(vcpu_seconds) / 3600 * 0.036 AS amount
FROM usage
GROUP BY entity_id
