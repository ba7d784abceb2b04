-- name: minimum_commitment
-- version: 1
-- window: 1d
-- lateness: 5m
-- currency: USD
-- description: vCPU-hours at 0.036 USD with a minimum daily commitment of 1.00 USD: a
-- description: day below it gets a shortfall line (resource_id = minimum) for the rest.
WITH q AS (
  SELECT entity_id, SUM(vcpu_seconds) / 3600 AS units FROM usage GROUP BY entity_id
)
SELECT entity_id, 'vcpu_hour' AS unit, 'usage' AS resource_id,
       units AS quantity, 0.036 AS unit_price, units * 0.036 AS amount
FROM q
UNION ALL
SELECT entity_id, 'commitment_shortfall' AS unit, 'minimum' AS resource_id,
       1 AS quantity, 1.00 - units * 0.036 AS unit_price, 1.00 - units * 0.036 AS amount
FROM q
WHERE units * 0.036 < 1.00
