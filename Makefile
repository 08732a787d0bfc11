# envoy-sidecar — see README.md.
CARGO ?= cargo
TEST_ENV := tests/env/containerd.sh

.PHONY: all build release deb deps test test-v2 unit integration lint demo bench install uninstall test-env-up test-env-down clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# A Debian package of the release build: target/envoy-sidecar_<version>_amd64.deb
# (lintian, when installed, must find no errors).
deb: release
	scripts/build-deb.sh

deps:
	scripts/install-deps.sh

# The whole suite: lint, unit tests, and the integration tests against a private
# containerd + runc of every engine stack in STACKS (tests/env/stack.sh: bookworm =
# the host's containerd 1.6 / runc 1.1, trixie = 1.7 / 1.1, sid = 2.1 / 1.3 and crun;
# the others are unpacked from Debian's packages, nothing of the host changes), one
# stack after another (as root, else they skip with a printed reason). One stack
# alone: `make test STACKS=sid`.
# The IPv6 tests turn IPv6 forwarding on (CNI's bridge plugin and the product do, for
# dual-stack containers), which makes the kernel drop default routes learned from
# router advertisements: put the host's setting back afterwards.
IPV6_FWD := /proc/sys/net/ipv6/conf/all/forwarding
STACKS ?= bookworm trixie sid
STACK_ENV := tests/env/stack.sh
# Then the tests that touch cgroups once more, inside a cgroup v2 guest booted in qemu
# from Debian's packages (tests/env/vm.sh; this host is cgroup v1). CGROUP_V2=0 leaves
# it out.
CGROUP_V2 ?= 1
VM_ENV := tests/env/vm.sh

test: lint deb
	$(CARGO) build --all-targets
	$(CARGO) test --lib --bins
	fwd=$$(cat $(IPV6_FWD) 2>/dev/null || true); rc=0; failed=""; \
	for s in $(STACKS); do \
		echo "==== make test: stack $$s ===="; \
		$(STACK_ENV) $$s test --test '*' -- --test-threads=4 || { rc=1; failed="$$failed $$s"; }; \
	done; \
	if [ -n "$$fwd" ] && [ "$$fwd" != "$$(cat $(IPV6_FWD))" ]; then \
		echo "$$fwd" > $(IPV6_FWD) && echo "make test: IPv6 forwarding put back to $$fwd"; fi; \
	if [ "$(CGROUP_V2)" = 1 ]; then \
		echo "==== make test: cgroup v2 guest ===="; \
		$(VM_ENV) test || { rc=1; failed="$$failed cgroup-v2-guest"; }; fi; \
	if [ $$rc -ne 0 ]; then echo "make test: FAILED on stack(s):$$failed"; fi; \
	exit $$rc

# The cgroup tests alone, inside the cgroup v2 guest (tests/env/vm.sh).
test-v2:
	$(CARGO) build --all-targets
	$(VM_ENV) test

unit:
	$(CARGO) test --lib --bins

integration:
	$(TEST_ENV) up
	$(CARGO) test --test '*'

# The [lints] table of Cargo.toml (SAFETY comments, casts) is enforced by clippy here;
# unsafe code lives only in src/sys/.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	@if grep -rnw unsafe src | grep -v '^src/sys/'; then \
		echo "lint: unsafe outside src/sys/ (above)" >&2; exit 1; fi

# Fresh machine to a container with CF_INSTANCE_PORTS, in one command.
demo: deps release
	$(TEST_ENV) up
	scripts/demo.sh

# Each script writes its own section of docs/BENCHMARKS.md (scripts/md-section.py).
bench: deps release
	$(TEST_ENV) up
	scripts/bench.sh
	scripts/bench-sidecar.sh
	scripts/bench-memory.sh
	scripts/bench-network.sh
	scripts/bench-scale.sh
	scripts/bench-density.sh
	scripts/bench-attribution.sh

# Binaries to /usr/local/bin, default config (kept if present), containerd drop-in,
# gc timer; `envoy-sidecar install --dry-run` shows what it would change.
install: release
	target/release/envoy-sidecar install

# Removes exactly what install added (its manifest), never an existing config.
uninstall:
	@if [ -x /usr/local/bin/envoy-sidecar ]; then /usr/local/bin/envoy-sidecar uninstall; \
	else target/release/envoy-sidecar uninstall; fi

test-env-up:
	$(TEST_ENV) up

test-env-down:
	$(TEST_ENV) down

clean:
	$(CARGO) clean
