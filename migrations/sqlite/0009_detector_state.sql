-- What the detectors learned (rate baselines, the places keys are used from), saved when
-- ingestion stops so that a restart does not begin a week of warm-up again. One row per
-- detector; the state is the detector's own JSON. Numbered 0009 to leave room for the
-- alert-delivery tables.
CREATE TABLE IF NOT EXISTS kw_detector_state (
    name TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    saved_at TEXT NOT NULL
);
