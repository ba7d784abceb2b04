-- name: tiered_volume
-- version: 1
-- window: 1d
-- lateness: 5m
-- currency: USD
-- description: Volume tiers from the rate card tiers.csv: all of the day's units at the
-- description: price of the tier the total falls in.
WITH q AS (
  SELECT entity_id, SUM(vcpu_seconds) / 3600 AS units FROM usage GROUP BY entity_id
)
SELECT q.entity_id,
       'vcpu_hour' AS unit,
       q.units AS quantity,
       t.unit_price AS unit_price,
       q.units * t.unit_price AS amount
FROM q JOIN tiers t
  ON q.units > t.from_units AND (t.to_units IS NULL OR q.units <= t.to_units)
