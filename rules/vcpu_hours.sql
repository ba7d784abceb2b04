-- name: vcpu_hours
-- version: 1
-- window: 1h
-- lateness: 5m
-- currency: USD
-- description: Allocated vCPU time, 0.036 USD per vCPU-hour (0.00001 per vCPU-second).
SELECT entity_id,
       'vcpu_hour' AS unit,
       SUM(vcpu_seconds) / 3600 AS quantity,
       0.036 AS unit_price,
       SUM(vcpu_seconds) * 0.00001 AS amount
FROM usage
GROUP BY entity_id
