p = "/work/main/server/vfed/server/app.py"
s = open(p).read()
old = '''    engine = db.make_engine(settings.db_url())
    if settings.auto_migrate:
        await db.upgrade(engine)
    app[ENGINE] = engine'''
new = '''    engine = db.open_engine(settings.db_url())  # db.DatabaseError: one line for `vserver start`
    try:
        await db.prepare(engine, upgrade_schema=settings.auto_migrate)
    except BaseException:
        await engine.dispose()
        raise
    app[ENGINE] = engine'''
assert s.count(old) == 1
s = s.replace(old, new)
open(p, "w").write(s)
p = "/work/main/server/vfed/server/db.py"
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old
    s = s.replace(old, new)
rep('''from alembic import command
from alembic.config import Config
from sqlalchemy import event, make_url
from sqlalchemy.engine import Connection
''', '''from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import event, inspect, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError, NoSuchModuleError
''')
s = s.rstrip("\n") + "\n" + open("/tmp/qc/db_add.py").read()
s = s.replace("    except CommandError:\n        return True", "    except (CommandError, RevisionError):\n        return True")
open(p, "w").write(s)
print("app/db patched")
