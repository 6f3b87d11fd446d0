"""Make the audit table append-only on Postgres.

UPDATE, DELETE and TRUNCATE are refused unless the transaction set
``sagas.allow_audit_rewrite`` to ``on`` (``sagas.audit.rewrite_allowed``), which only an
explicit retention command and the test suite's teardown do. SQLite has no such guard;
the demo runs there and production runs on Postgres.
"""

from django.db import migrations

FUNCTION = """
CREATE OR REPLACE FUNCTION sagas_audit_append_only() RETURNS trigger AS $$
BEGIN
    IF coalesce(current_setting('sagas.allow_audit_rewrite', true), '') = 'on' THEN
        IF TG_LEVEL = 'ROW' THEN
            RETURN coalesce(NEW, OLD);
        END IF;
        RETURN NULL;
    END IF;
    -- The message is concatenated: this SQL goes through a DB-API cursor (no percent signs).
    RAISE EXCEPTION USING
        MESSAGE = 'sagas_auditentry is append-only: ' || TG_OP || ' refused',
        ERRCODE = 'insufficient_privilege',
              HINT = 'Audit entries are never changed or deleted.';
END;
$$ LANGUAGE plpgsql;
"""

TRIGGERS = """
CREATE TRIGGER sagas_audit_no_update_delete
    BEFORE UPDATE OR DELETE ON sagas_auditentry
    FOR EACH ROW EXECUTE FUNCTION sagas_audit_append_only();
CREATE TRIGGER sagas_audit_no_truncate
    BEFORE TRUNCATE ON sagas_auditentry
    FOR EACH STATEMENT EXECUTE FUNCTION sagas_audit_append_only();
"""

REVERSE = """
DROP TRIGGER IF EXISTS sagas_audit_no_truncate ON sagas_auditentry;
DROP TRIGGER IF EXISTS sagas_audit_no_update_delete ON sagas_auditentry;
DROP FUNCTION IF EXISTS sagas_audit_append_only();
"""


def install(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FUNCTION)
        schema_editor.execute(TRIGGERS)


def uninstall(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(REVERSE)


class Migration(migrations.Migration):
    dependencies = [("sagas", "0001_initial")]

    operations = [migrations.RunPython(install, uninstall)]
