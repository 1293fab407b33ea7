#!/bin/sh
# Breaks each safety-relevant line on purpose, in a scratch copy of the
# committed tree, and checks that the tests catch it: one line per mutant,
# "caught by" the failing tests, or "NOT CAUGHT" (exit 1). About a minute
# per mutant (a release build and the tests that could see it).
#   sh tests/mutants.sh [NAME...]      default: all
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/nbd-vram-mutants.XXXXXX)
trap 'git -C "$top" worktree remove --force "$work/tree" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$top" worktree add -q --detach "$work/tree" HEAD || exit 1
cd "$work/tree" || exit 1
export CARGO_TARGET_DIR="$top/target/mutants"

# NAME FILE PYTHON-REGEX REPLACEMENT [known gap: WHY]: what each mutant
# changes. The regex must match exactly once. A mutant with a known gap is
# reported, with why no test can see it yet, and does not fail the run.
mutants() {
	cat <<'EOF'
mask-after-init	src/main.rs	(?s)    if serves \{\n        signals::Signals::block\(\);\n    \} else \{\n        signals::Signals::block_wake\(\);\n    \}\n	
mask-after-init	src/serve.rs	let signals = Signals::taken\(\);	let signals = Signals::block();
mask-after-init	src/daemon.rs	let signals = Signals::taken\(\);	let signals = Signals::block();
no-release	src/cuda/mailbox.rs	\tst\.release\.sys\.global\.u32 \[%rd1\+64\]	\tst.volatile.global.u32 [%rd1+64]
no-acquire	src/cuda/mailbox.rs	\tld\.acquire\.sys\.global\.u64 %rd4	\tld.volatile.global.u64 %rd4
cached-loads	src/cuda/mailbox.rs	ld\.global\.cv\.v4\.u32 \{%r6, %r7, %r8, %r9\}, \[%rd8\]	ld.global.v4.u32 {%r6, %r7, %r8, %r9}, [%rd8]
torn-job	src/cuda/mailbox.rs	(?s)        self\.job\(\)\.store\(u64::from\(self\.seq\) \| word, Ordering::Release\);	        self.job().store(word, Ordering::Relaxed);\n        self.u32_at(JOB).store(self.seq, Ordering::Release);
data-after-post	src/cuda/mailbox.rs	(?s)        self\.landing\[\.\.data\.len\(\)\]\.copy_from_slice\(data\);\n        self\.post\(self\.lone\(dst, data\.len\(\)\) \| WRITE\)	        let seq = self.post(self.lone(dst, data.len()) | WRITE);\n        self.landing[..data.len()].copy_from_slice(data);\n        seq
no-deadline	src/cuda/mailbox.rs	false if start\.elapsed\(\) > PATIENCE =>	false if false =>
query-ignored	src/store/vram/resident.rs	!stream\.is_done\(\)\.unwrap_or\(false\)	stream.is_done().is_err()
copier-stream-non-blocking	src/cuda/mod.rs	        self\.stream_with\(0\)\n	        self.stream_with(sys::CU_STREAM_NON_BLOCKING)\n
late-job-races	src/store/vram/copier.rs	        self\.resident\.forget_abandoned\(\)\?;\n	
sync-hides-failed-batch	src/store/vram/copier.rs	        if failed \{\n            return Err\(io::Error::from_raw_os_error\(libc::EIO\)\);\n        \}\n        finished	        let _ = failed;\n        finished
unrecorded-fence-done	src/store/vram/fences.rs	                    self\.unrecorded = Some\(token\);\n	
failed-batch-kept	src/store/vram/copier.rs	                b\.copies\.clear\(\);\n	\n
one-sm-kernel	src/cuda/mailbox.rs	Ok\(sms\) if \(sms as usize\) < resident \+ 1 =>	Ok(sms) if (sms as usize) < resident =>
no-follow	src/store/vram/lanes.rs	                stream\.wait_for\(&self\.lanes\.lanes\[j\]\.event\)\?;\n	
mailbox-write-unawaited	src/store/vram/copier.rs	(?s)            if let Err\(e\) = self\.resident\.finish_writes\(&mut self\.fences\) \{\n                error!\("\{e\}"\);\n            \}\n	
flush-own-only	src/store/vram/copier.rs	if self\.lane\.as_ref\(\)\.is_some_and\(\|lane\| lane\.news\(Span::ALL\)\) \{	if false {
no-streaming-stores	src/uncached.rs	        stream\(&mut self\.dst\[self\.at\.\.self\.at \+ src\.len\(\)\], src\);\n	
no-store-fence	src/uncached.rs	std::arch::x86_64::_mm_sfence\(\);	std::arch::x86_64::_mm_lfence();	known gap: x86 makes streaming stores visible soon without it, and the fake driver's copies start after a lock handover; only a rare race on real hardware would show it
multi-conn-always	src/nbd/proto.rs	if connections > 1 \{	if connections > 0 {
serve-before-all-open	src/workers.rs	let serve = \*go == Some\(true\);	let serve = true;
missed-write-kept	src/store/vram/resident.rs	            self\.missed_write \|= p\.writes;	            self.missed_write |= false;
failed-group-unpublished	src/store/vram/copier.rs	        let token = self\.fences\.fence\(\);\n        if let Some\(lane\)	        let token = self.fences.fence();\n        if failed {\n            return Err(Unfenced::NotStarted);\n        }\n        if let Some(lane)
early-header-data-dropped	src/nbd/transmit.rs	if self\.shared\.lost\(\) && !told \{	if self.shared.lost() {
stale-alive	src/cuda/mailbox.rs	        self\.u32_at\(ALIVE\)\.store\(u32::MAX, Ordering::Relaxed\);\n        let \(mut slot	        let (mut slot
shared-cwd	src/swap.rs	if unsafe \{ libc::unshare\(libc::CLONE_FS\) \} < 0 \{	if false {
size-before-claim	src/slice.rs	(?s)        let mut given = 0;\n(.*?)        let configured = dev\n            \.configure\(export\.size, export\.flags, request_timeout\(opts\)\)\n            \.map_err\([^\n]*\n	        let _ = dev.configure(export.size, export.flags, request_timeout(opts));\n        let mut given = 0;\n\1        let configured = Ok::<(), Failure>(())\n	known gap: only the kernel's NBD driver shows it: the VM test's claimed_while_starting fails, which this script does not run
cut-write-undoes-others	src/nbd/transmit.rs	                if whole \|\| alone \{	                if whole || alone || true {
follow-init-off	src/reroot.rs	        if now == self\.seen \{	        if true {	known gap: only a real switch_root shows it: the VM test's after_switch_root fails (resize times out in the new root), which this script does not run
in-use-detached	src/slice/control.rs	Ok\(claim @ \(Claim::Ours \{ \.\. \} \| Claim::Unknown\)\) => return Some\(claim\),	Ok(claim) => return Some(claim),	known gap: only the kernel shows it: the VM test's second_instance fails (a --no-swap device that is swap of the administrator's own is detached), which this script does not run
claim-not-exclusive	src/swap.rs	libc::O_RDONLY \| libc::O_EXCL\)	libc::O_RDONLY)
claim-dropped-early	src/slice/control.rs	(?s)    end_device\(dev, ours\);\n    drop\(claim\);	    drop(claim);\n    end_device(dev, ours);	known gap: only a swapon or mount landing in the microseconds between the claim and NBD_DISCONNECT shows it, which no test can time
stop-misses-given-back	src/stop.rs	if let Some\(\(pid, name\)\) = status::started_on\(dev\) \{	if let Some((pid, name)) = None::<(u32, String)> {	known gap: only the kernel shows it: the VM test's after_switch_root fails (stop by the device given back leaves the daemon running), which this script does not run
swapoff-in-daemon	src/swap.rs	match child::swapoff\(self\.dev, fds\) \{	match Err::<io::Result<()>, _>(io::Error::from_raw_os_error(libc::ENOENT)) {
flush-failed-by-later	src/nbd/transmit.rs	if req\.command == sys::NBD_CMD_FLUSH \{\n(\s*// Nor does)	if false {\n\1
stuck-client-holds-kernel	src/nbd/transmit.rs	            self\.store\.idle\(\);\n(\s*self\.send_from)	\1
silent-refusal	src/serve.rs	Client::Unix\(mut c\) => proto::refuse\(&mut Deadline \{ conn: &mut c, at \}, &why\),	Client::Unix(_) => Ok(()),
waiting-in-line	src/serve.rs	\.or_else\(\|c\| waiting\.hand\(c, Some\(Duration::ZERO\)\)\)	.or_else(|c| desk.hand(c, Some(GRACE)))
failed-counted-done	src/nbd/transmit.rs	self\.stats\.record\(slot\.command, slot\.len, slot\.error\(\)\);	self.stats.record(slot.command, slot.len, 0);
job-control-stops	src/main.rs	signals::Signals::ignore_job_control\(\);	let _ = signals::Signals::ignore_job_control;	known gap: only the kernel shows it: the VM test's nbd_up fails (the daemon does not ignore SIGTSTP, SIGTTIN and SIGTTOU), which this script does not run
sigchld-inherited	src/signals.rs	        unsafe \{ libc::signal\(libc::SIGCHLD, libc::SIG_DFL\) \};\n	
sibling-swapoff-as-room	src/swap.rs	saturating_sub\(total / 64 \+ taken\)	saturating_sub(total / 64)
stop-misses-last-file	src/stop.rs	    failed \|= status::failed\(&files\);\n    if failed \{	    if failed {
failed-file-removed	src/status.rs	(?s)    if any_failed\(stats\) \{\n        return;\n    \}\n	
ask-outlives-reserve	src/elastic.rs	(?s)(at every dip\.\n)                self\.asked = false;\n	\1
usage-unread	src/daemon.rs	            self\.refresh_usage\(\);\n	            let _ = Self::refresh_usage;\n	known gap: only the kernel shows it: the VM test's stop_during_swapoff fails (status shows no pages in swap with 81 MiB there), which this script does not run
idle-is-stall	src/nbd/transmit.rs	if e\.kind\(\) == io::ErrorKind::WouldBlock && self\.bufs\.input\.available\(\) == 0 =>	if false =>
no-ram-check	src/swap.rs	if let Some\(\(need, room\)\) = shortage_in\(&table\(\), &meminfo, path, &going\) \{	if let Some((need, room)) = None::<(u64, u64)> {	known gap: only the kernel shows it: the VM test's stop_short_of_ram fails (the OOM killer kills during a stop that RAM cannot take), which this script does not run
no-gpu-watcher	src/store/neighbours.rs	                    neighbours\.look\(ctx\);\n	
untouched-stack	src/nbd/transmit.rs	    crate::touch::stack\(\);\n	\n
untouched-batch	src/cuda/mod.rs	        crate::touch::spare\(&mut b\.srcs\);\n	\n
calloc-input	src/nbd/input.rs	buf: crate::touch::zeroed\(INPUT_LEN\)\?,	buf: vec![0u8; INPUT_LEN].into_boxed_slice(),
failed-store-clean-exit	src/daemon.rs	Ok\(\(\)\) if failed =>	Ok(()) if false =>	known gap: only the kernel shows it: the VM test's store_failed fails (the daemon exits 0 after its store failed), which this script does not run
accept-shortage-fatal	src/serve.rs	Some\(libc::EMFILE \| libc::ENFILE \| libc::ENOBUFS \| libc::ENOMEM\) =>	Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM) =>
stall-unbounded-payload	src/serve.rs	set_recv_timeout\(client\.as_fd\(\), Some\(STALL\)\)	set_recv_timeout(client.as_fd(), None)
stall-unbounded-reply	src/serve.rs	set_send_timeout\(client\.as_fd\(\), Some\(STALL\)\)	set_send_timeout(client.as_fd(), None)
wake-ends-commands	src/main.rs	        signals::Signals::block_wake\(\);\n	
busy-swapon-ends-device	src/slice/control.rs	Err\(e\) if e\.raw_os_error\(\) == Some\(libc::EBUSY\) => match beaten_to_swapon	Err(e) if false => match beaten_to_swapon	known gap: only the kernel shows it: the VM test's swapon_beaten fails (the daemon cut the link of a device something else held), which this script does not run
beaten-never-adopts	src/slice/control.rs	if let Some\(area\) = swap::active\(path\) \{	if let Some(area) = swap::active(path).filter(|_| false) {	known gap: only the kernel shows it: the VM test's swapon_beaten fails (the daemon never takes another's swapon as its swap), which this script does not run
busy-swapon-not-retried	src/slice/control.rs	Beaten::Released\(claim\) if tries < SWAPON_TRIES => drop\(claim\),	Beaten::Released(claim) if false => drop(claim),	known gap: only the kernel shows it: the VM test's swapon_beaten fails (the daemon does not make a device swap once let go), which this script does not run
busy-device-allocated-first	src/daemon.rs	        slice::refuse_if_served\(path\)\?;\n	        let _ = path;\n	known gap: only the kernel shows it: the VM test's second_instance fails (a second server on a busy /dev/nbd0, given 16 MiB of address space, fails to allocate its store instead of refusing), which this script does not run
EOF
}

apply() {   # FILE REGEX REPLACEMENT
	python3 - "$@" <<'EOF'
import re, sys
path, pattern, repl = sys.argv[1], sys.argv[2], sys.argv[3].replace("\\n", "\n")
text = open(path).read()
new, n = re.subn(pattern, lambda m: m.expand(repl), text)
if n != 1:
    sys.exit(f"{path}: the pattern matched {n} times: {pattern}")
open(path, "w").write(new)
EOF
}

names=${*:-$(mutants | cut -f1 | uniq)}
bad=0
for name in $names; do
	git checkout -q -- .
	mutants | awk -F'\t' -v n="$name" '$1 == n' >"$work/m"
	[ -s "$work/m" ] || { echo "no mutant $name"; bad=1; continue; }
	ok=1 gap=""
	while IFS="$(printf '\t')" read -r _ file regex repl known; do
		apply "$file" "$regex" "$repl" || ok=0
		[ -n "${known:-}" ] && gap=$known
	done <"$work/m"
	[ $ok = 1 ] || { echo "mutant $name: does not apply"; bad=1; continue; }
	if ! cargo build --release -q 2>"$work/build"; then
		echo "mutant $name: caught by the compiler"; continue
	fi
	caught="" odd=""
	for t in "--bin nbd-vram" "--test vram_start" "--test vram_copies" "--test vram_failures" "--test vram_mailbox" "--test vram_shared" "--test lifecycle" "--test connections"; do
		# shellcheck disable=SC2086
		timeout 600 cargo test --release -q $t >"$work/out" 2>&1 && continue
		# Only a test that fails by name catches it: a test target that
		# does not build, or a run cut off by the timeout, names none.
		names=$(grep -E '^    [a-z0-9_:]+$' "$work/out" | tr -d ' ' | tr '\n' ' ')
		if [ -n "$names" ]; then caught="$caught $names"; else odd="$odd [$t]"; fi
	done
	if [ -n "$caught" ]; then echo "mutant $name: caught by$caught${odd:+ (and failed with no test named in$odd)}"
	elif [ -n "$odd" ]; then echo "mutant $name: NOT CAUGHT by any test by name: failed with none named in$odd"; bad=1
	elif [ -n "$gap" ]; then echo "mutant $name: not caught ($gap)"
	else echo "mutant $name: NOT CAUGHT"; bad=1; fi
done
exit $bad
