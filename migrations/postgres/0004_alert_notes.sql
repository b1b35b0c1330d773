-- note: why a person marked an alert benign. An alert marked benign keeps status 'benign'
-- through later updates of the same episode; a new episode after it resolved fires again.
-- detected_at: the event time at which the detector first raised the episode (started_at can
-- be earlier: the first evidence it rests on), so detection delay can be read off the table.
ALTER TABLE kw_alerts ADD COLUMN IF NOT EXISTS note TEXT;
ALTER TABLE kw_alerts ADD COLUMN IF NOT EXISTS detected_at TIMESTAMPTZ;
