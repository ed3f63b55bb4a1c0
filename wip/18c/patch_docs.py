import os
root = "/work/main/"
def rep(path, old, new):
    p = root + path
    s = open(p).read()
    assert s.count(old) == 1, (path, old)
    open(p, "w").write(s.replace(old, new))

rep("docs/server.md",
    "vserver db upgrade                             # migrate the schema (start-up does this too unless auto_migrate: false)\n",
    "vserver db upgrade                             # migrate the schema (`vserver start --upgrade` does it first;\n"
    "                                               # plain `start` refuses an older schema, creates an empty one)\n"
    "vserver backup out.tar.gz; vserver restore out.tar.gz --data-dir /srv/new   # SQLite + blobs (docs/deployment.md)\n")
rep("docs/server.md",
    "Unknown keys are refused; an error names the key:",
    "Every key can also come from the environment (`VFED_SERVER__<KEY>`, `__` between nested keys; flags >\n"
    "environment > file), and `jwt_secret`, `database_password` and `mqtt.password` from files (`<key>_file`):\n"
    "docs/deployment.md \"Configuration from the environment, operations, database errors\". `auto_migrate`\n"
    "(default `false`) set to `true` means always `--upgrade`.\n\n"
    "Unknown keys are refused; an error names the key:")
path = root + "docs/deployment.md"
section = open("/tmp/qc/deployment_section.md").read()
if os.path.exists(path):
    s = open(path).read()
    open(path, "w").write(s.rstrip("\n") + "\n\n" + section)
else:
    open(path, "w").write("# Deploying vfed across machines\n\n" + section)
print("docs patched")
rep("docs/vnode.md",
    "| `private_key_passphrase_file` | unset | a file holding it instead (not both; relative to the config's folder) |\n",
    "| `private_key_passphrase_file` | unset | a file holding it instead (not both; relative to the config's folder) |\n"
    "| `api_key_file` | unset | a file holding `api_key` instead (not both; relative to the config's folder; for `vnode run`, e.g. a Kubernetes secret: `vnode start` does not mount it into the agent container) |\n")
rep("docs/vnode.md",
    "## Secrets, metrics and the data folder (node config)\n",
    "## Secrets, metrics and the data folder (node config)\n\n"
    "`vnode run` also reads `VFED_NODE__<KEY>` variables over the file (`__` between nested keys, lists as\n"
    "JSON, `VFED_NODE__API_KEY_FILE` for the key), and runs from the environment alone without `--config`;\n"
    "docs/deployment.md \"Configuration from the environment, operations, database errors\".\n")
rep("docs/security.md",
    "## Secrets of the dockerized agent\n",
    "## Secrets from files (server and `vnode run`)\n\n"
    "Every secret setting has a `<key>_file` form (`jwt_secret_file`, `database_password_file`,\n"
    "`mqtt.password_file`, the node's `api_key_file`), in the config file or as `VFED_SERVER__..._FILE` /\n"
    "`VFED_NODE__..._FILE`: deployments hand secrets over as mounted Docker or Kubernetes secrets, never as\n"
    "environment values or command-line arguments (both readable through /proc and `docker inspect`). The\n"
    "database password stays out of `database_url`; every database message masks it (`***`). `vserver backup`\n"
    "archives are written 0600: they hold password hashes, node key hashes and the JWT secret\n"
    "(docs/deployment.md).\n\n"
    "## Secrets of the dockerized agent\n")
print("docs2 patched")
rep("README.md",
    "- Server: `vserver start`, `vserver import federation.yaml`, `vserver db upgrade` — [docs/server.md](docs/server.md),",
    "- Server: `vserver start [--upgrade]`, `vserver import federation.yaml`, `vserver db upgrade`,\n"
    "  `vserver backup|restore`; settings from a file, `VFED_SERVER__*` variables and secret files\n"
    "  ([docs/deployment.md](docs/deployment.md)) — [docs/server.md](docs/server.md),")
print("readme patched")
