-- History is append-only, enforced by the database itself rather than by convention:
-- a price change adds a version (never edits one, so past requests keep the price they
-- were billed at), audit rows are never edited or removed, and a ledger row, once
-- written, is never re-priced. Deleting old ledger rows (retention) stays possible.

CREATE FUNCTION tollgate_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER prices_append_only BEFORE UPDATE OR DELETE ON prices
    FOR EACH ROW EXECUTE FUNCTION tollgate_append_only();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION tollgate_append_only();
CREATE TRIGGER usage_ledger_no_update BEFORE UPDATE ON usage_ledger
    FOR EACH ROW EXECUTE FUNCTION tollgate_append_only();

-- Reports and reconciliation group by team and key over a time range.
CREATE INDEX usage_ledger_team_started_at ON usage_ledger (team_id, started_at);
CREATE INDEX usage_ledger_key_started_at ON usage_ledger (key_id, started_at);
CREATE INDEX audit_log_target ON audit_log (target, id);
