# The two set-up commands of the README: `make test` and `make demo`. Both install what they
# need first (scripts/install-deps.sh), on a fresh Debian 12 machine, as root.

CARGO ?= cargo

.PHONY: all deps test lint unit demo demo-qmp install bench bench-quick fuzz clean

all: test

deps:
	bash scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Unit, property, scripted-server and real-peer integration tests. Test binaries run one at a
# time; tests inside a binary run in parallel (2 cores).
unit:
	$(CARGO) test --workspace --locked

test: deps lint unit

# The main job through the daemon on a real guest (libvirt, TCG).
demo: deps
	$(CARGO) build --release --locked -p cbt-hostd
	bash scripts/demo.sh

# The same engine straight on QMP, without libvirt or the daemon.
demo-qmp: deps
	$(CARGO) build --release --locked -p cbt-hostd
	bash scripts/demo-qmp.sh

# Installs cbt-hostd and cbtctl, the systemd unit and (if missing) a configuration.
PREFIX ?= /usr/local
install:
	$(CARGO) build --release --locked -p cbt-hostd
	install -D -m 0755 target/release/cbt-hostd $(DESTDIR)$(PREFIX)/bin/cbt-hostd
	install -D -m 0755 target/release/cbtctl $(DESTDIR)$(PREFIX)/bin/cbtctl
	install -D -m 0644 hostd/systemd/cbt-hostd.service $(DESTDIR)/etc/systemd/system/cbt-hostd.service
	[ -e $(DESTDIR)/etc/cbt/hostd.toml ] || install -D -m 0600 hostd/systemd/hostd.toml.example $(DESTDIR)/etc/cbt/hostd.toml
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; set a token hash in /etc/cbt/hostd.toml (cbt-hostd --hash-token < TOKEN-FILE), then: systemctl enable --now cbt-hostd"

# Side-by-side benchmarks against nbdcopy, nbdinfo, qemu-img and virtnbdbackup (≈ 12 min);
# results in bench/results/.
bench: deps
	$(CARGO) build --release --locked -p cbt-bench -p cbt-hostd
	./target/release/cbt-bench all --out bench/results/latest.json

bench-quick: deps
	$(CARGO) build --release --locked -p cbt-bench -p cbt-hostd
	./target/release/cbt-bench all --quick --out bench/results/quick.json

# Short fuzzing runs of every target (installs cargo-fuzz when missing).
fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	cd fuzz && for t in nbd_reply nbd_handshake nbd_server qmp_line format_objects; do \
	  mkdir -p target/corpus/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t target/corpus/$$t corpus/$$t -- -max_total_time=$${FUZZ_SECONDS:-30} || exit 1; \
	done

clean:
	$(CARGO) clean
