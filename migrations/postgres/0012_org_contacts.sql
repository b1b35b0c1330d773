-- Where an organization wants its own alerts: a route with `to_org = true` also sends the
-- organization's alerts here. keywatch's own table: the auth server's organizations table
-- has no such address, and keywatch never alters it.
CREATE TABLE IF NOT EXISTS kw_org_contacts (
    org_id TEXT PRIMARY KEY NOT NULL,
    alert_email TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
