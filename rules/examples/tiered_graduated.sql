-- name: tiered_graduated
-- version: 1
-- window: 1d
-- lateness: 5m
-- currency: USD
-- description: Graduated tiers from the rate card tiers.csv: each tier's units at that
-- description: tier's price, one line per tier (resource_id = tier) per entity and day.
WITH q AS (
  SELECT entity_id, SUM(vcpu_seconds) / 3600 AS units FROM usage GROUP BY entity_id
)
SELECT q.entity_id,
       'vcpu_hour' AS unit,
       CAST(t.tier AS VARCHAR) AS resource_id,
       LEAST(q.units, COALESCE(t.to_units, q.units)) - t.from_units AS quantity,
       t.unit_price AS unit_price,
       (LEAST(q.units, COALESCE(t.to_units, q.units)) - t.from_units) * t.unit_price AS amount
FROM q JOIN tiers t ON q.units > t.from_units
