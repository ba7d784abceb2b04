-- name: tiered_graduated_monthly
-- version: 1
-- window: 1h
-- lateness: 5m
-- currency: USD
-- description: Graduated tiers across the billing period (tiers.csv): each hour's
-- description: vCPU-hours are priced where the entity's month-to-date usage stands, so
-- description: the month's first 100 vCPU-hours cost 0.040, the next 900 0.030, the rest 0.020.
WITH q AS (
  SELECT entity_id, SUM(vcpu_seconds) / 3600 AS units FROM usage GROUP BY entity_id
),
x AS (
  SELECT q.entity_id,
         COALESCE(d.vcpu_seconds / 3600, 0) AS lo,
         COALESCE(d.vcpu_seconds / 3600, 0) + q.units AS hi
  FROM q LEFT JOIN usage_to_date d ON q.entity_id = d.entity_id
)
SELECT x.entity_id,
       'vcpu_hour' AS unit,
       CAST(t.tier AS VARCHAR) AS resource_id,
       LEAST(x.hi, COALESCE(t.to_units, x.hi)) - GREATEST(x.lo, t.from_units) AS quantity,
       t.unit_price AS unit_price,
       (LEAST(x.hi, COALESCE(t.to_units, x.hi)) - GREATEST(x.lo, t.from_units)) * t.unit_price AS amount
FROM x JOIN tiers t
  ON x.hi > t.from_units AND (t.to_units IS NULL OR x.lo < t.to_units)
