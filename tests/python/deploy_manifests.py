"""Checks every YAML file under deploy/ as a cluster or a compose run would read it.

    deploy_manifests.py REPO_ROOT TOLLGATE_BINARY KUBERNETES_VERSION

- every YAML document parses;
- every Kubernetes object validates, strictly (unknown fields refused), against the JSON
  schemas of the pinned Kubernetes version (kubernetes-validate ships them, so no network);
- a ServiceMonitor (a CRD, absent from those schemas) selects a Service applied with it (its
  file's directory) and scrapes a port that Service names;
- every routes.toml a ConfigMap or the compose stack mounts passes `tollgate check`;
- every file the compose stack mounts exists.

Prints one line per object checked; exits non-zero naming the file and object on the first
defect.
"""

import pathlib
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def tollgate_check(binary, config, origin):
    result = subprocess.run(
        [binary, "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env={"TOLLGATE_LOG": "error", "PATH": "/usr/bin:/bin"},
    )
    if result.returncode != 0:
        fail(f"{origin}: tollgate check refused its routes.toml:\n{result.stderr}")
    print(f"{origin}: routes.toml {result.stdout.strip()}")


def check_kubernetes(path, documents, services, version, binary):
    for document in documents:
        kind = document.get("kind")
        name = document.get("metadata", {}).get("name")
        where = f"{path}: {kind}/{name}"
        if kind == "ServiceMonitor":
            check_service_monitor(where, document, services)
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            fail(f"{where}: invalid against Kubernetes {version}: {error.message} at {list(error.path)}")
        except kubernetes_validate.SchemaNotFoundError as error:
            fail(f"{where}: no schema in Kubernetes {version}: {error}")
        print(f"{where}: valid against Kubernetes {version}")
        if kind == "ConfigMap" and "routes.toml" in document.get("data", {}):
            with tempfile.TemporaryDirectory() as directory:
                config = pathlib.Path(directory) / "routes.toml"
                config.write_text(document["data"]["routes.toml"])
                tollgate_check(binary, config, where)


def check_service_monitor(where, monitor, services):
    if monitor.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(f"{where}: apiVersion must be monitoring.coreos.com/v1")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in services
        if all(s["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
    ]
    if not selected:
        fail(f"{where}: selects no Service of these manifests by {wanted}")
    ports = {p.get("name") for s in selected for p in s["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in ports:
            fail(f"{where}: scrapes port {endpoint.get('port')!r}, the Service names {sorted(ports)}")
        if not endpoint.get("path", "/metrics").startswith("/"):
            fail(f"{where}: path {endpoint['path']!r} is not absolute")
    print(f"{where}: selects Service {selected[0]['metadata']['name']}, ports {sorted(ports)}")


def check_compose(path, compose, binary):
    directory = path.parent
    for name, service in compose.get("services", {}).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                mounted = directory / source
                if not mounted.exists():
                    fail(f"{path}: service {name} mounts {source}, which does not exist")
                if mounted.name == "routes.toml":
                    tollgate_check(binary, mounted, f"{path}: service {name}")
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = directory / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.exists():
                fail(f"{path}: service {name} builds from {dockerfile}, which does not exist")
    print(f"{path}: {len(compose.get('services', {}))} services, mounts present")


def main():
    root, binary, version = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    files = sorted(
        p for p in (root / "deploy").rglob("*") if p.suffix in (".yml", ".yaml")
    )
    if not files:
        fail("no YAML under deploy/")
    parsed = {}
    for path in files:
        try:
            parsed[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as error:
            fail(f"{path}: not YAML: {error}")
    # `kubectl apply -f DIR` applies a directory's files together: a ServiceMonitor may select
    # a Service from another file of its directory.
    services = {}
    for path, documents in parsed.items():
        services.setdefault(path.parent, []).extend(
            d for d in documents if d.get("kind") == "Service"
        )
    for path, documents in parsed.items():
        relative = path.relative_to(root)
        if relative.parts[:2] == ("deploy", "k8s"):
            check_kubernetes(relative, documents, services[path.parent], version, binary)
        elif path.name in ("docker-compose.yml", "compose.yml"):
            check_compose(path, documents[0], binary)
        else:
            print(f"{relative}: parses")


if __name__ == "__main__":
    main()
