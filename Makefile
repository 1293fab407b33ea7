# nbd-vram: build, test, install.
PREFIX ?= /usr/local
CARGO ?= cargo
BIN := target/release/nbd-vram

.PHONY: all deps test test-vm lint clean bench
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
# nbdinfo, nbdcopy, nbdsh) and the fake libcuda, all on the release binary;
# then the kernel path in a VM.
test: deps lint
	$(CARGO) test --release
	$(MAKE) test-vm

# The real kernel (Debian's, in qemu) swapping to nbd-vram under a memory
# hog 1.5x its RAM, fake VRAM outside guest RAM. One PASS/FAIL line.
test-vm: $(BIN)
	sh tests/vm/run.sh

# nbd-vram serve --store host against nbdkit (memory) and qemu-nbd (/dev/shm
# file) on unix sockets: bench table with ratios, nbdcopy cross-check, and a
# request-size sweep plotted to target/bench/throughput.svg. About 3 minutes.
# Raw output is not kept in the tree; the figures quoted, with command, date
# and machine, are in docs/performance.md (docs/throughput.svg is one plot).
bench: $(BIN)
	sh tests/bench/compare.sh $(BIN)

clean:
	$(CARGO) clean

# ---- Installation (files from dist/) ----------------------------------------
# make install [PREFIX=/usr/local] [DESTDIR=/staging]: the binary and man page
# under PREFIX; units, modules-load.d, initramfs-tools and dracut files where
# systemd, kmod and the initramfs builders look, whatever PREFIX is. The
# units, the initramfs hooks and the man page name the binary by its full
# path: /usr/local/bin is rewritten to $(PREFIX)/bin as they are installed.
# /etc/default/nbd-vram is installed only where none exists; uninstall
# removes it only if it is still the shipped one. install builds first (a
# no-op when up to date); where root has no cargo: `make && sudo make
# install CARGO=true`.
DESTDIR ?=
BINDIR = $(PREFIX)/bin
MAN8DIR = $(PREFIX)/share/man/man8
UNITDIR ?= /lib/systemd/system
MODLOADDIR ?= /usr/lib/modules-load.d
ITDIR ?= /usr/share/initramfs-tools
DRACUTDIR ?= /usr/lib/dracut/modules.d/90nbd-vram
DEFAULTDIR ?= /etc/default
INSTALL ?= install
REPREFIX = sed 's|/usr/local/bin|$(BINDIR)|g'

.PHONY: install uninstall tiny
install: $(BIN)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MAN8DIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(MODLOADDIR) $(DESTDIR)$(ITDIR)/hooks \
		$(DESTDIR)$(ITDIR)/scripts/init-premount $(DESTDIR)$(ITDIR)/scripts/local-premount \
		$(DESTDIR)$(DRACUTDIR) \
		$(DESTDIR)$(DEFAULTDIR)
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/nbd-vram
	$(REPREFIX) dist/nbd-vram.8 >$(DESTDIR)$(MAN8DIR)/nbd-vram.8 && chmod 0644 $(DESTDIR)$(MAN8DIR)/nbd-vram.8
	for u in nbd-vram.service nbd-vram@.service; do \
		$(REPREFIX) dist/systemd/$$u >$(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	$(INSTALL) -m 0644 dist/modules-load.d/nbd-vram.conf $(DESTDIR)$(MODLOADDIR)/nbd-vram.conf
	$(REPREFIX) dist/initramfs-tools/hooks/nbd-vram >$(DESTDIR)$(ITDIR)/hooks/nbd-vram && chmod 0755 $(DESTDIR)$(ITDIR)/hooks/nbd-vram
	$(INSTALL) -m 0755 dist/initramfs-tools/scripts/init-premount/nbd-vram $(DESTDIR)$(ITDIR)/scripts/init-premount/nbd-vram
	$(INSTALL) -m 0755 dist/initramfs-tools/scripts/local-premount/nbd-vram $(DESTDIR)$(ITDIR)/scripts/local-premount/nbd-vram
	$(REPREFIX) dist/dracut/90nbd-vram/module-setup.sh >$(DESTDIR)$(DRACUTDIR)/module-setup.sh && chmod 0755 $(DESTDIR)$(DRACUTDIR)/module-setup.sh
	$(INSTALL) -m 0755 dist/dracut/90nbd-vram/nbd-vram-start.sh $(DESTDIR)$(DRACUTDIR)/nbd-vram-start.sh
	[ -e $(DESTDIR)$(DEFAULTDIR)/nbd-vram ] || $(INSTALL) -m 0644 dist/default/nbd-vram $(DESTDIR)$(DEFAULTDIR)/nbd-vram
	@echo "installed; then: systemctl daemon-reload && systemctl enable --now nbd-vram (or nbd-vram@0 ...)"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/nbd-vram $(DESTDIR)$(MAN8DIR)/nbd-vram.8 \
		$(DESTDIR)$(UNITDIR)/nbd-vram.service $(DESTDIR)$(UNITDIR)/nbd-vram@.service \
		$(DESTDIR)$(MODLOADDIR)/nbd-vram.conf $(DESTDIR)$(ITDIR)/hooks/nbd-vram \
		$(DESTDIR)$(ITDIR)/scripts/init-premount/nbd-vram $(DESTDIR)$(ITDIR)/scripts/local-premount/nbd-vram \
		$(DESTDIR)$(DRACUTDIR)/module-setup.sh $(DESTDIR)$(DRACUTDIR)/nbd-vram-start.sh
	rmdir $(DESTDIR)$(DRACUTDIR) 2>/dev/null || true
	! cmp -s dist/default/nbd-vram $(DESTDIR)$(DEFAULTDIR)/nbd-vram || rm -f $(DESTDIR)$(DEFAULTDIR)/nbd-vram

# The smallest binary stable Rust makes: the release profile (LTO, one
# codegen unit, panic=abort, strip) optimised for size ([profile.tiny] in
# Cargo.toml). Prints both sizes when a release build exists.
tiny:
	$(CARGO) build --profile tiny
	@for f in target/tiny/nbd-vram $(BIN); do \
		[ ! -e $$f ] || echo "$$(stat -c %s $$f) bytes  $$f"; \
	done
