set -e
cd /tmp/qc
# dry run on fresh copies of the current files
for f in server/vfed/server/config.py server/vfed/server/app.py server/vfed/server/db.py server/vfed/server/cli.py node/vfed/node/config.py node/vfed/node/cli.py; do cp /work/main/$f tree/$f; done
for f in patch_server_config.py patch_app.py patch_server_cli.py patch_node_config.py patch_node_cli.py; do sed "s#/work/main/#/tmp/qc/tree/#g" $f > tree_$f; python3 tree_$f; done
echo DRY-RUN-OK
cp env_config.py /work/main/common/vfed/common/env_config.py
cp backup.py /work/main/server/vfed/server/backup.py
for f in patch_server_config.py patch_app.py patch_server_cli.py patch_node_config.py patch_node_cli.py; do python3 $f; done
cp test_server_env_config.py test_server_operations.py /work/main/tests/server/
cp test_node_env_config.py /work/main/tests/node/
echo APPLIED
