-- Why a person marked an alert benign (or any later human note on it). An alert marked benign
-- keeps status 'benign' through later updates of the same episode; a new episode after it
-- resolved fires again.
ALTER TABLE kw_alerts ADD COLUMN note TEXT;
