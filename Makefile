# The two set-up commands of the README: `make test` and `make demo`. Both install what they
# need first (scripts/install-deps.sh), on a fresh Debian 12 machine, as root.

CARGO ?= cargo

.PHONY: all deps test lint unit demo bench bench-quick fuzz clean

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

demo: deps
	$(CARGO) build --release --locked -p cbt-hostd
	bash scripts/demo.sh

# Side-by-side benchmarks against nbdcopy and nbdinfo; results in bench/results/.
bench: deps
	$(CARGO) build --release --locked -p cbt-bench -p cbt-hostd
	./target/release/cbt-bench all --out bench/results/latest.json

bench-quick: deps
	$(CARGO) build --release --locked -p cbt-bench -p cbt-hostd
	./target/release/cbt-bench all --quick --out bench/results/quick.json

# Short fuzzing runs of every target (installs cargo-fuzz when missing).
fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	cd fuzz && for t in nbd_reply nbd_handshake qmp_line format_objects; do \
	  mkdir -p target/corpus/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t target/corpus/$$t corpus/$$t -- -max_total_time=$${FUZZ_SECONDS:-30} || exit 1; \
	done

clean:
	$(CARGO) clean
