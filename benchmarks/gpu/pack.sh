#!/bin/bash
# Packs what an offline GPU machine with Python 3.12 and torch (but no ManiSkill) needs to run the scripts, into
# .dev/ (git-ignored through .git/info/exclude): the pinned mani-skill / sapien / transformers and their small
# dependencies as one site-packages tarball (about 55 MB: the robots other than the Panda, environment maps and
# headers are left out to fit a 64 MiB transfer), the Vulkan/GL loader packages SAPIEN's renderer needs, and the
# first 20 of the PickCube demos the main job generated (all 200 do not fit beside the rest).
# Run here (needs pip's registries and apt); then, on the GPU machine, benchmarks/gpu/check.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.dev/" >> .git/info/exclude; }
PY=${PY:-3.12}
W=$(mktemp -d); S=$W/site
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
pin() { grep -E "^$1==" requirements.txt; }
# mani-skill's and sapien's imports that the machine's image lacks (torch, numpy, scipy, h5py, ... are there).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp $PLAT -d "$W/whl" \
  "$(pin transformers)" "$(pin mani-skill)" sapien==3.0.3 gymnasium==1.4.0 "$(pin tyro)" dacite defusedxml \
  transforms3d trimesh farama-notifications docstring-parser typeguard pytorch_kinematics==0.7.6 \
  arm_pytorch_utilities pytorch_seed GitPython gitdb smmap importlib_resources pyperclip
python3 -m pip install -q --no-deps --no-compile --target "$S" --python-version "$PY" --implementation cp \
  --only-binary=:all: $PLAT "$W"/whl/*.whl
# mani_skill imports IPython for notebook helpers only: a stand-in instead of IPython and its dependencies.
mkdir -p "$S/IPython" && touch "$S/IPython/__init__.py"
printf 'def display(*a, **k):\n    pass\n\n\nclass HTML(str):\n    pass\n' > "$S/IPython/display.py"
A=$S/mani_skill/assets
find "$A/robots" -mindepth 1 -maxdepth 1 ! -name panda -exec rm -rf {} +
rm -rf "$A/robots/panda/realsense2_description" "$A/robots/panda/sciurus17_description" "$A/environment_maps" \
  "$S/mani_skill/utils/scene_builder/replicacad/autumn_field_puresky_4k.hdr" "$S/mani_skill/examples" \
  "$S/sapien/include"
find "$S" -name "*.pyc" -delete
mkdir -p .dev/gl
tar -C "$S" -cf - . | xz -T0 -6 > .dev/site.tar.xz
o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$W/lists"
mkdir -p "$W/lists/partial"
apt-get $o update >/dev/null 2>&1
(cd .dev/gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 \
  libx11-6 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0 libx11-data 2>/dev/null)
rm -rf "$W"
mkdir -p .dev/demos
.venv/bin/python - <<'PY'
import json
import h5py
src = "demos/planner_acc0.9/PickCube-v1/motionplanning/mp200.state.pd_ee_delta_pose.physx_cpu"
meta = json.load(open(src + ".json"))
meta["episodes"] = meta["episodes"][:20]
with h5py.File(src + ".h5") as f, h5py.File(".dev/demos/mp20.h5", "w") as g:
    for ep in meta["episodes"]:
        f.copy(f"traj_{ep['episode_id']}", g)
json.dump(meta, open(".dev/demos/mp20.json", "w"))
PY
du -sh .dev/site.tar.xz .dev/gl .dev/demos
