#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: a private virtualenv (.venv) with the pinned requirements and,
# only when no usable Vulkan device exists, a private Mesa 25 lavapipe (software Vulkan) for SAPIEN/ManiSkill.
# Re-running it does nothing that is already done. On a machine with a GPU driver the Vulkan step changes nothing.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PY=${PYTHON:-python3}

# 1. Python environment: reinstall only when requirements.txt changed.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi

# The repo root and settings every process of the venv needs, applied at interpreter start by a .pth file (a standard
# site-packages mechanism; no installed file is patched). MuJoCo (LIBERO) renders headless through EGL.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PTH="$SITE/pi_rl_env.pth"
LINE='import os; os.environ.setdefault("MUJOCO_GL", "egl")'

# 2. Vulkan. SAPIEN needs a Vulkan device even for state observations.
vulkan_ok() {  # can SAPIEN create a ManiSkill env here?
  env "$@" .venv/bin/python - >/dev/null 2>&1 <<'EOF'
import gymnasium as gym, mani_skill.envs  # noqa: F401
gym.make("PickCube-v1", obs_mode="state", num_envs=1, sim_backend="physx_cpu").close()
EOF
}
LVP="$ROOT/.vulkan"
ICD="$LVP/lvp_icd.json"
if [ -f "$ICD" ] && vulkan_ok VK_ICD_FILENAMES="$ICD"; then
  LINE="$LINE; os.environ.setdefault(\"VK_ICD_FILENAMES\", \"$ICD\")"
elif vulkan_ok -u VK_ICD_FILENAMES; then
  echo "setup: a Vulkan device is available; no software renderer needed"
else
  echo "setup: no usable Vulkan device; installing Mesa 25 lavapipe privately into $LVP"
  # Debian 12's own lavapipe (Mesa 22) lacks a feature SAPIEN needs; bookworm-backports has Mesa 25.
  # Use the machine's own Debian mirror with the suite switched, through a private apt state directory.
  mkdir -p "$LVP/apt/lists/partial" "$LVP/apt/archives/partial" "$LVP/root"
  uri=$(python3 - <<'EOF'
import glob, re
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for block in open(path).read().split("\n\n"):
        f = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", block, re.M))
        if "bookworm" in f.get("Suites", "").split() and "deb" in f.get("Types", ""):
            print(f["URIs"].split()[0]); raise SystemExit
lines = open("/etc/apt/sources.list").read().splitlines() if glob.glob("/etc/apt/sources.list") else []
for line in lines:  # one-line format: deb [options] URI SUITE COMPONENT...
    p = [x for x in re.sub(r"\[[^]]*\]", "", line).split()]
    if len(p) >= 3 and p[0] == "deb" and p[2] == "bookworm":
        print(p[1]); raise SystemExit
raise SystemExit("no Debian bookworm entry in /etc/apt sources")
EOF
)
  echo "deb $uri bookworm-backports main" > "$LVP/apt/sources.list"
  APT=(-o Dir::Etc::SourceList="$LVP/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null -o APT::Sandbox::User=root
       -o Dir::State::Lists="$LVP/apt/lists" -o Dir::Cache::Archives="$LVP/apt/archives")
  apt-get "${APT[@]}" -q update >/dev/null
  (cd "$LVP/apt" && apt-get "${APT[@]}" -q download mesa-vulkan-drivers/bookworm-backports >/dev/null)
  dpkg -x "$(ls "$LVP"/apt/mesa-vulkan-drivers_*.deb | head -n1)" "$LVP/root"
  lib=$(find "$LVP/root" -name libvulkan_lvp.so | head -n1)
  printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.4.305"}}\n' "$lib" > "$ICD"
  vulkan_ok VK_ICD_FILENAMES="$ICD" || { echo "setup: lavapipe installed but SAPIEN still cannot create an env" >&2; exit 1; }
  LINE="$LINE; os.environ.setdefault(\"VK_ICD_FILENAMES\", \"$ICD\")"
fi
printf '%s\n%s\n' "$ROOT" "$LINE" > "$PTH"  # the repo root on sys.path: `import vla` from anywhere
echo "setup: done (.venv ready)"
