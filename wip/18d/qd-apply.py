"""Land qd's files into /work/main with targeted edits."""
import shutil, sys
from pathlib import Path
R = Path("/work/main"); D = Path("/tmp/h/qd-draft")
def replace_once(path, old, new):
    p = R / path; s = p.read_text()
    if s.count(old) != 1:
        sys.exit(f"{path}: anchor found {s.count(old)} times: {old[:60]!r}")
    p.write_text(s.replace(old, new))
for f in ["compose.yaml", "node.compose.yaml", "postgres.Dockerfile", "postgres-entrypoint.sh",
          "mosquitto.Dockerfile", "healthcheck.py"]:
    shutil.copy2(D / "docker" / f, R / "docker" / f)
(R / "docker/systemd").mkdir(exist_ok=True)
for f in ["vserver.service", "vnode@.service"]:
    shutil.copy2(D / "docker/systemd" / f, R / "docker/systemd" / f)
(R / "tests/deploy").mkdir(exist_ok=True)
for f in ["test_deploy_compose.py", "test_deploy_systemd.py"]:
    shutil.copy2(D / "tests/deploy" / f, R / "tests/deploy" / f)
replace_once("docker/server.Dockerfile", """# vfed/server: the central server.
FROM vfed/base
USER vfed
EXPOSE 7600
ENTRYPOINT ["vserver"]
""", (D / "docker/server.Dockerfile").read_text().split('CMD ["start"')[0])
snippet = (D / "build-snippet.sh").read_text()
replace_once("scripts/build-images.sh", "\nmain() {\n", snippet + "\nmain() {\n")
replace_once("scripts/build-images.sh",
    '    build vfed/algorithm-base "$ctx/algorithm-base.Dockerfile" "$ctx" "$h"\n',
    '    build vfed/algorithm-base "$ctx/algorithm-base.Dockerfile" "$ctx" "$h"\n    build_services\n')
replace_once("scripts/ensure-infra.sh",
    "    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)\n",
    "    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)\n"
    "    command -v docker-compose >/dev/null || missing+=(docker-compose)  # validates docker/compose.yaml\n")
replace_once("scripts/ensure-infra.sh", 'say "mosquitto, postgresql, debootstrap: present"',
    'say "mosquitto, postgresql, debootstrap, docker-compose: present"')
dep = R / "docs/deployment.md"
section = (D / "deployment-section.md").read_text()
if dep.exists():
    dep.write_text(dep.read_text().rstrip("\n") + "\n\n" + section)
else:
    dep.write_text("# Deploying vfed across machines\n\nEach part of a real deployment has its own section below.\n\n" + section)
print("applied")
replace_once("README.md", "(docker.io, mosquitto, postgresql, debootstrap)",
             "(docker.io, mosquitto, postgresql, debootstrap, docker-compose)")
replace_once("README.md", "| `docker/` | Dockerfiles: `vfed/base`, `vfed/node`, `vfed/server`, `vfed/algorithm-base` |",
             "| `docker/` | Dockerfiles: `vfed/base`, `vfed/node`, `vfed/server`, `vfed/algorithm-base`, `vfed/postgres`, "
             "`vfed/mosquitto`; `compose.yaml`, `node.compose.yaml`, `systemd/` ([docs/deployment.md](docs/deployment.md)) |")
replace_once("README.md", "3. The Dockerfiles install only from that wheelhouse: `pip install --no-index --find-links /tmp/wheels vfed`.\n",
             "3. The Dockerfiles install only from that wheelhouse: `pip install --no-index --find-links /tmp/wheels vfed`.\n"
             "4. For `docker/compose.yaml` without a registry it builds `vfed/postgres` and `vfed/mosquitto` from Debian's\n"
             "   packages on debootstrapped roots (docs/deployment.md).\n")
print("readme")
