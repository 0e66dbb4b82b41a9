-- twisted_novnc schema: idempotent, safe to apply again.
BEGIN;

CREATE TABLE IF NOT EXISTS "auth_sessions" (
    "session_id" uuid PRIMARY KEY,
    user_id uuid,
    provider text,
    "status" text NOT NULL DEFAULT 'pending',
    browser_vm_id text,
    "vm_ip" text,
    vnc_url text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION "twisted_novnc_notify"() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    shards int := COALESCE(TG_ARGV[2], '0')::int;
    new_id text;
    old_id text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_id := to_jsonb(NEW) ->> TG_ARGV[1];
        PERFORM pg_notify(CASE WHEN shards > 0 THEN TG_ARGV[0] || '_'
            || ((('x' || substr(md5(COALESCE(new_id, '')), 1, 7))::bit(28)::int) % shards)
            ELSE TG_ARGV[0] END, new_id);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_id := to_jsonb(OLD) ->> TG_ARGV[1];
        IF old_id IS DISTINCT FROM new_id THEN
            PERFORM pg_notify(CASE WHEN shards > 0 THEN TG_ARGV[0] || '_'
                || ((('x' || substr(md5(COALESCE(old_id, '')), 1, 7))::bit(28)::int) % shards)
                ELSE TG_ARGV[0] END, old_id);
        END IF;
    END IF;
    RETURN NULL;
END
$body$;

DROP TRIGGER IF EXISTS "twisted_novnc_notify" ON "auth_sessions";
CREATE TRIGGER "twisted_novnc_notify"
    AFTER INSERT OR UPDATE OR DELETE ON "auth_sessions"
    FOR EACH ROW EXECUTE FUNCTION "twisted_novnc_notify"('twisted_novnc', 'session_id', '0');

COMMIT;
