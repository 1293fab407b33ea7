# nbd-vram: build, test, install.
PREFIX ?= /usr/local
CARGO ?= cargo
BIN := target/release/nbd-vram

.PHONY: all deps test lint clean
all: $(BIN)

$(BIN): FORCE
	$(CARGO) build --release

FORCE:

# Debian packages for building (libclang for bindgen) and for the tests' real
# NBD clients and VM; installs only what is missing, and only as root.
deps:
	sh tests/deps.sh

lint:
	$(CARGO) clippy --release --all-targets -- -D warnings

# Unit tests, then integration tests against real NBD clients (qemu-io,
# nbdinfo, nbdcopy, nbdsh), all on the release binary.
test: deps lint
	$(CARGO) test --release

clean:
	$(CARGO) clean
