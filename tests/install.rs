//! `make install` / `make uninstall` into a scratch DESTDIR, and what the
//! installed files must be: modes, paths rewritten to PREFIX, units that
//! `systemd-analyze verify` accepts, a man page that renders without a
//! warning, an initramfs-tools hook and a dracut module that put the
//! expected files in an image. Needs make, systemd-analyze (package
//! systemd), man (man-db) and groff (groff-base); not root.
//!
//! The initramfs-tools hook runs against the real
//! /usr/share/initramfs-tools/hook-functions where initramfs-tools is
//! installed, else against a small stub with the same copy_file/copy_exec
//! contract (tests/deps.sh does not install initramfs-tools-core: on
//! Debian 12 it drags in a udev that upgrades systemd in the test image).
//! Either way manual_add_modules is replaced by a logger, since the test
//! machine has no /lib/modules for the modules it names. dracut is never
//! installed: module-setup.sh is sourced with stubbed inst_* functions.
//! The initramfs-tools boot script itself runs under busybox in a root of
//! its own (chroot: that test needs root, and says it skipped otherwise).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_nbd-vram");

/// Every file `make install PREFIX=/usr` puts, with its mode.
const FILES: &[(&str, u32)] = &[
    ("usr/bin/nbd-vram", 0o755),
    ("usr/share/man/man8/nbd-vram.8", 0o644),
    ("lib/systemd/system/nbd-vram.service", 0o644),
    ("lib/systemd/system/nbd-vram@.service", 0o644),
    ("usr/lib/modules-load.d/nbd-vram.conf", 0o644),
    ("usr/share/initramfs-tools/hooks/nbd-vram", 0o755),
    ("usr/share/initramfs-tools/scripts/init-premount/nbd-vram", 0o755),
    ("usr/share/initramfs-tools/scripts/local-premount/nbd-vram", 0o755),
    ("usr/lib/dracut/modules.d/90nbd-vram/module-setup.sh", 0o755),
    ("usr/lib/dracut/modules.d/90nbd-vram/nbd-vram-start.sh", 0o755),
    ("etc/default/nbd-vram", 0o644),
];

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("install-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(found, "{tool} not found: install the Debian package `{package}` (tests/deps.sh does)");
}

/// `make TARGET DESTDIR=dest PREFIX=/usr`, with the binary cargo already
/// built for this test: CARGO=true keeps make from running a second cargo
/// inside this one.
fn make(target: &str, dest: &Path) {
    run(Command::new("make")
        .current_dir(ROOT)
        .arg("--no-print-directory")
        .arg(target)
        .arg(format!("DESTDIR={}", dest.display()))
        .arg("PREFIX=/usr")
        .arg(format!("BIN={BIN}"))
        .arg("CARGO=true")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL"));
}

/// Every file or link left under `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let kind = fs::symlink_metadata(&path).unwrap().file_type();
        if kind.is_dir() {
            found.extend(leftovers(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn install_verify_uninstall() {
    for (tool, package) in [("make", "make"), ("systemd-analyze", "systemd"), ("man", "man-db"), ("groff", "groff-base")] {
        need(tool, package);
    }
    let dest = scratch("dest");
    make("install", &dest);

    for (file, mode) in FILES {
        let path = dest.join(file);
        let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("{file} not installed: {e}"));
        assert!(meta.is_file(), "{file} is not a file");
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{file}: mode {:o}, expected {mode:o}", meta.permissions().mode());
    }
    assert_eq!(leftovers(&dest).len(), FILES.len(), "install put files not in the list: {:?}", leftovers(&dest));
    assert_eq!(fs::read(dest.join("usr/bin/nbd-vram")).unwrap(), fs::read(BIN).unwrap(), "the installed binary is not the built one");
    for (file, _) in FILES.iter().filter(|(f, _)| !f.ends_with("bin/nbd-vram")) {
        assert!(!text(&dest.join(file)).contains("/usr/local"), "{file} still names /usr/local after install with PREFIX=/usr");
    }

    units(&dest);
    man_page(&dest);
    initramfs_tools(&dest);
    dracut(&dest);

    make("uninstall", &dest);
    assert_eq!(leftovers(&dest), Vec::<PathBuf>::new(), "uninstall left files behind");
    let _ = fs::remove_dir_all(&dest);
}

fn units(dest: &Path) {
    let unit_dir = dest.join("lib/systemd/system");
    let single = text(&unit_dir.join("nbd-vram.service"));
    assert!(single.contains("\nExecStart=/usr/bin/nbd-vram --size 7168 --device /dev/nbd0 --priority 100\n"), "{single}");
    assert!(!single.contains("\nExecStop="), "a device named there may serve another daemon by then");
    let template = text(&unit_dir.join("nbd-vram@.service"));
    assert!(template.contains("\nExecStart=/usr/bin/nbd-vram --gpu %i "), "{template}");
    assert!(template.contains("--device auto --priority 100\n"));
    assert!(!template.contains("\nExecStop="), "the template cannot know its auto device");
    for unit in [&single, &template] {
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "OOMScoreAdjust=-1000",
            "LimitMEMLOCK=infinity",
            "DefaultDependencies=no",
            "Conflicts=shutdown.target",
            "Before=shutdown.target",
            "Before=swap.target",
            "After=systemd-modules-load.service",
            "Wants=systemd-modules-load.service",
            "WantedBy=swap.target",
            "SendSIGKILL=no",
            "KillMode=mixed",
            "Restart=no",
            "ConditionPathExists=!/run/nbd-vram/initramfs",
        ] {
            assert!(unit.lines().any(|l| l == line), "a unit lacks {line}");
        }
    }
    // --root: executables and the unit are looked up in the DESTDIR tree,
    // so ExecStart=/usr/bin/nbd-vram is checked against the installed
    // binary; MANPATH: Documentation=man:nbd-vram(8) against the installed
    // page. Unknown keys and bad values only warn: any output fails.
    for unit in ["nbd-vram.service", "nbd-vram@.service"] {
        let out = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", dest.display()))
            .arg(format!("/lib/systemd/system/{unit}"))
            .env("MANPATH", dest.join("usr/share/man"))
            .env("SYSTEMD_LOG_COLOR", "0"));
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");
    }
}

fn man_page(dest: &Path) {
    let page = dest.join("usr/share/man/man8/nbd-vram.8");
    let out = run(Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("LC_ALL", "C"));
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(out.stderr.is_empty(), "man warns:\n{}", String::from_utf8_lossy(&out.stderr));
    for heading in [
        "NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES", "ENVIRONMENT", "TROUBLESHOOTING", "IF THE DAEMON DIES",
        "SEE ALSO",
    ] {
        assert!(rendered.lines().any(|l| l == heading), "the man page has no {heading} section (is man-db minimised?)");
    }
    // Every flag and exit code of --help is documented.
    let help = run(Command::new(BIN).arg("--help")).stdout;
    let help = String::from_utf8_lossy(&help);
    for word in help.split_whitespace().filter(|w| w.starts_with('-')) {
        let flag = word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        assert!(rendered.contains(flag), "the man page does not mention {flag}");
    }
    for code in 0..=8 {
        assert!(rendered.lines().any(|l| l.trim_start().starts_with(&format!("{code}  "))), "exit code {code} undocumented");
    }
    for sub in ["serve", "gpus", "stop", "status [--json]", "bench"] {
        assert!(rendered.contains(&format!("nbd-vram {sub}")), "SYNOPSIS lacks {sub}");
    }
    let out = run(Command::new("groff").args(["-man", "-ww", "-z"]).arg(&page));
    assert!(out.stderr.is_empty(), "groff warns:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A stand-in for initramfs-tools' hook-functions where that is not
/// installed: copy_file and copy_exec copy into $DESTDIR (creating the
/// directories, returning 1 for a file already there), as the real ones do.
const HOOK_FUNCTIONS_STUB: &str = r#"
copy_file() {
	src=$2; target=${3:-$2}
	[ -f "$src" ] || return 2
	[ -e "${DESTDIR}/${target}" ] && return 1
	mkdir -p "${DESTDIR}/${target%/*}" && cp -pL "$src" "${DESTDIR}/${target}"
}
copy_exec() { copy_file binary "$1" "${2:-$1}" || return $(($? - 1)); }
"#;

fn initramfs_tools(dest: &Path) {
    let work = scratch("initramfs-tools");
    let stage = work.join("stage");
    fs::create_dir(&stage).unwrap();
    let real = Path::new("/usr/share/initramfs-tools/hook-functions");
    let functions = if real.exists() {
        eprintln!("initramfs-tools hook: with the installed {}", real.display());
        real.to_path_buf()
    } else {
        eprintln!("initramfs-tools hook: initramfs-tools not installed, with a stub hook-functions");
        let stub = work.join("hook-functions");
        fs::write(&stub, HOOK_FUNCTIONS_STUB).unwrap();
        stub
    };
    let shim = work.join("shim");
    fs::write(&shim, "manual_add_modules() { echo \"$*\" >>\"$DESTDIR/../modules\"; }\n").unwrap();
    let libcuda = work.join("libcuda.so.1");
    fs::copy(BIN, &libcuda).unwrap();
    // What libcuda loads itself beside it: here its PTX compiler, no NVML.
    let ptxjit = work.join("libnvidia-ptxjitcompiler.so.1");
    fs::copy(BIN, &ptxjit).unwrap();
    let config = work.join("nbd-vram.conf");
    let installed_bin = dest.join("usr/bin/nbd-vram");

    // The installed hook, pointed at the scratch tree: its three paths of
    // this machine are the only lines changed.
    let hook_src = text(&dest.join("usr/share/initramfs-tools/hooks/nbd-vram"));
    let mut replaced = 0;
    let hook: String = hook_src
        .lines()
        .map(|l| {
            let new = match l {
                ". /usr/share/initramfs-tools/hook-functions" => format!(". {}; . {}", functions.display(), shim.display()),
                "BIN=/usr/bin/nbd-vram" => format!("BIN={}", installed_bin.display()),
                "CONFIG=/etc/default/nbd-vram" => format!("CONFIG={}", config.display()),
                _ => return format!("{l}\n"),
            };
            replaced += 1;
            format!("{new}\n")
        })
        .collect();
    assert_eq!(replaced, 3, "the hook no longer has its BIN=, CONFIG= or hook-functions lines:\n{hook_src}");
    let hook_path = work.join("hook");
    fs::write(&hook_path, hook).unwrap();
    let run_hook = || {
        run(Command::new("sh").arg(&hook_path).env("DESTDIR", &stage).env("verbose", "n").env("version", "0.0.0-test"))
    };

    let prereqs = run(Command::new("sh").arg(&hook_path).arg("prereqs"));
    assert_eq!(String::from_utf8_lossy(&prereqs.stdout).trim(), "");

    // Off (the shipped default): the hook adds nothing.
    fs::copy(dest.join("etc/default/nbd-vram"), &config).unwrap();
    assert!(text(&config).contains("\nNBD_VRAM_INITRAMFS=no\n"));
    run_hook();
    assert!(leftovers(&stage).is_empty(), "NBD_VRAM_INITRAMFS=no still added {:?}", leftovers(&stage));

    // On, with a libcuda to take along.
    let on = format!(
        "{}\nNBD_VRAM_INITRAMFS=yes\nNBD_VRAM_LIBCUDA={}\n",
        text(&config).replace("NBD_VRAM_INITRAMFS=no", "").replace("NBD_VRAM_LIBCUDA=", "#"),
        libcuda.display()
    );
    fs::write(&config, on).unwrap();
    run_hook();
    let image_bin = stage.join("usr/bin/nbd-vram");
    assert_eq!(fs::read(&image_bin).unwrap(), fs::read(BIN).unwrap(), "no nbd-vram in the image");
    assert!(fs::metadata(&image_bin).unwrap().permissions().mode() & 0o111 != 0, "nbd-vram not executable in the image");
    assert_eq!(text(&stage.join("etc/default/nbd-vram")), text(&config));
    let image_lib = stage.join(libcuda.strip_prefix("/").unwrap());
    assert!(image_lib.is_file(), "libcuda.so.1 not copied to {}", image_lib.display());
    let image_ptxjit = stage.join(ptxjit.strip_prefix("/").unwrap());
    assert!(image_ptxjit.is_file(), "the PTX compiler not copied to {}", image_ptxjit.display());
    assert!(!image_ptxjit.with_file_name("libnvidia-ml.so.1").exists(), "an NVML that is not there was copied");
    for tool in ["grep", "sed", "mknod"] {
        assert!(stage.join("bin").join(tool).is_file(), "{tool}, which the boot script runs, is not in the image");
    }
    assert_eq!(text(&stage.join("conf/nbd-vram.conf")).trim(), format!("NBD_VRAM_LIBCUDA_IMAGE='{}'", libcuda.display()));
    let modules = text(&work.join("modules"));
    assert_eq!(modules.lines().collect::<Vec<_>>(), ["nbd", "nvidia nvidia_uvm"], "modules asked for");

    // The boot scripts: their prerequisites, and syntax for every shell an
    // initramfs may run them with.
    for (phase, prereq) in [("init-premount", "udev"), ("local-premount", "resume")] {
        let script = dest.join("usr/share/initramfs-tools/scripts").join(phase).join("nbd-vram");
        let prereqs = run(Command::new("sh").arg(&script).arg("prereqs"));
        assert_eq!(String::from_utf8_lossy(&prereqs.stdout).trim(), prereq);
        syntax(&script);
    }
    let _ = fs::remove_dir_all(&work);
}

/// `sh -n` with every POSIX shell present (dash, busybox ash, bash).
fn syntax(script: &Path) {
    let mut checked = 0;
    for shell in [&["sh"][..], &["dash"], &["busybox", "sh"], &["bash", "--posix"]] {
        let present = Command::new("sh").args(["-c", &format!("command -v {}", shell[0])]).output().is_ok_and(|o| o.status.success());
        if present {
            run(Command::new(shell[0]).args(&shell[1..]).arg("-n").arg(script));
            checked += 1;
        }
    }
    assert!(checked > 0);
}

fn dracut(dest: &Path) {
    let work = scratch("dracut");
    let moddir = dest.join("usr/lib/dracut/modules.d/90nbd-vram");
    let setup = moddir.join("module-setup.sh");
    assert!(text(&setup).contains("\nNBD_VRAM_BIN=/usr/bin/nbd-vram\n"), "module-setup.sh not rewritten to PREFIX");
    let config = work.join("nbd-vram.conf");
    let libcuda = work.join("libcuda.so.1");
    fs::copy(BIN, &libcuda).unwrap();
    let ptxjit = work.join("libnvidia-ptxjitcompiler.so.1");
    fs::copy(BIN, &ptxjit).unwrap();
    let initdir = work.join("initdir");
    fs::create_dir(&initdir).unwrap();
    let log = work.join("calls");

    // dracut sources module-setup.sh in bash and calls its functions; the
    // inst_* helpers record their arguments here.
    let driver = format!(
        r#"
log() {{ echo "$*" >>"{log}"; }}
inst_binary() {{ log inst_binary "$@"; }}
inst_simple() {{ log inst_simple "$@"; }}
inst_library() {{ log inst_library "$@"; }}
inst_multiple() {{ log inst_multiple "$@"; }}
inst_hook() {{ log inst_hook "$@"; }}
instmods() {{ log instmods "hostonly=$hostonly" "$@"; }}
dwarn() {{ log dwarn "$@"; }}
dracut_module_included() {{ [ "$1" = systemd ] && [ -n "$WITH_SYSTEMD" ]; }}
WITH_SYSTEMD=
hostonly=yes
moddir="{moddir}"
initdir="{initdir}"
. "{setup}"
NBD_VRAM_CONFIG="{config}"
check; echo "check-missing-config=$?"
printf 'NBD_VRAM_INITRAMFS=no\n' >"$NBD_VRAM_CONFIG"
check; echo "check-off=$?"
printf 'NBD_VRAM_INITRAMFS=yes\nNBD_VRAM_LIBCUDA={libcuda}\n' >"$NBD_VRAM_CONFIG"
check; echo "check-on=$?"
depends; echo "depends=$?"
installkernel; echo "installkernel=$?"
install; echo "install=$?"
echo with-systemd >>"{log}"
WITH_SYSTEMD=1
installkernel; echo "installkernel-systemd=$?"
install; echo "install-systemd=$?"
NBD_VRAM_BIN=/nonexistent/nbd-vram
check; echo "check-no-binary=$?"
"#,
        log = log.display(),
        moddir = moddir.display(),
        initdir = initdir.display(),
        setup = setup.display(),
        config = config.display(),
        libcuda = libcuda.display(),
    );
    // module-setup.sh names the installed binary, which is in DESTDIR here.
    let driver = driver.replace(
        &format!(". \"{}\"\n", setup.display()),
        &format!(". \"{}\"\nNBD_VRAM_BIN=\"{}\"\n", setup.display(), dest.join("usr/bin/nbd-vram").display()),
    );
    let out = run(Command::new("bash").arg("-c").arg(&driver));
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        [
            "check-missing-config=255",
            "check-off=255",
            "check-on=0",
            "depends=0",
            "installkernel=0",
            "install=0",
            "installkernel-systemd=0",
            "install-systemd=0",
            "check-no-binary=1"
        ],
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = text(&log);
    let expected = [
        "instmods hostonly= nbd".to_string(),
        "instmods hostonly= nvidia nvidia_uvm".to_string(),
        format!("inst_binary {} /usr/bin/nbd-vram", dest.join("usr/bin/nbd-vram").display()),
        format!("inst_simple {} /etc/default/nbd-vram", config.display()),
        format!("inst_library {}", libcuda.display()),
        format!("inst_library {}", ptxjit.display()),
        "inst_multiple -o nvidia-modprobe mknod sed grep".to_string(),
        format!("inst_hook pre-mount 50 {}/nbd-vram-start.sh", moddir.display()),
        // An image that runs systemd gets nothing: it would stop the
        // daemon at switch_root.
        "with-systemd".to_string(),
        "dwarn nbd-vram: not started from this image, which runs systemd: systemd stops every process at switch_root, which would end the device under swap; the systemd units start it after boot".to_string(),
    ];
    assert_eq!(calls.lines().collect::<Vec<_>>(), expected);
    assert_eq!(
        text(&initdir.join("etc/nbd-vram/initramfs.conf")).trim(),
        format!("NBD_VRAM_LIBCUDA_IMAGE='{}'", libcuda.display())
    );
    syntax(&moddir.join("nbd-vram-start.sh"));
    let _ = fs::remove_dir_all(&work);
}

/// An /etc/default/nbd-vram of the admin's own survives install and
/// uninstall.
#[test]
fn admin_config_is_kept() {
    let dest = scratch("keep");
    let config = dest.join("etc/default/nbd-vram");
    fs::create_dir_all(config.parent().unwrap()).unwrap();
    fs::write(&config, "NBD_VRAM_INITRAMFS=yes\n").unwrap();
    make("install", &dest);
    assert_eq!(text(&config), "NBD_VRAM_INITRAMFS=yes\n", "install overwrote the admin's config");
    make("uninstall", &dest);
    assert_eq!(leftovers(&dest), vec![config], "uninstall removed the admin's config or left others");
    let _ = fs::remove_dir_all(&dest);
}

/// An initramfs carries the binary with the libraries it names: those must
/// be libc alone (plus the loader), whatever a change to the code pulls in.
#[test]
fn the_binary_needs_only_libc() {
    let out = Command::new("readelf").args(["--dynamic", BIN]).output().expect("readelf (binutils)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).filter_map(|l| l.split('[').nth(1)).map(|l| l.trim_end_matches(']')).collect();
    assert_eq!(needed, ["libc.so.6"], "{text}");
}

/// The boot scripts themselves, initramfs-tools' and dracut's, run by
/// busybox in a root of their own (chroot, so root only) with a stand-in
/// daemon: each waits for swap a bounded time whatever NBD_VRAM_WAIT says,
/// notes the daemon's PID for the units, and notes nothing for a daemon
/// that exited; dracut's starts nothing in an initramfs that runs systemd,
/// and initramfs-tools' starts it only after the hibernation resume check
/// where the boot names a resume device. The daemon they start is named
/// '@nbd-vram' (tests/boot/standin.c).
#[test]
fn the_boot_scripts_wait_a_bounded_time_and_note_the_daemon() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return eprintln!("skipped: chroot needs root");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists()).expect("busybox (tests/deps.sh installs it)");
    let boot = |script, env, daemon, wait, says, secs, starts, noted| Boot { script, env, daemon, wait, says, secs, starts, noted, noted_before: false };
    const RESUME: &[(&str, &str)] = &[("resume", "UUID=5eed")];
    let cases = [
        boot(TOOLS, &[], "exit", "5", "exited at start", 0..=5, true, false),
        boot(TOOLS, &[], "live", "2", "no swap after 2 s", 2..=10, true, true),
        boot(TOOLS, &[], "swap", "20", "Starting nbd-vram", 1..=10, true, true),
        boot(TOOLS, &[], "live", "30s", "NBD_VRAM_WAIT='30s' is no number of seconds; waiting 30", 30..=50, true, true),
        boot(TOOLS, RESUME, "swap", "20", "", 0..=2, false, false),
        boot(TOOLS, &[("resume", "UUID=5eed"), ("noresume", "y")], "swap", "20", "Starting nbd-vram", 1..=10, true, true),
        boot(TOOLS, &[("resume", "UUID=5eed"), ("BOOT", "nfs")], "swap", "20", "Starting nbd-vram", 1..=10, true, true),
        boot(TOOLS, &[("resume", "UUID=5eed"), ("BOOT", "zfs")], "swap", "20", "", 0..=2, false, false),
        boot(TOOLS_AFTER_RESUME, RESUME, "swap", "20", "Starting nbd-vram", 1..=10, true, true),
        boot(TOOLS_AFTER_RESUME, &[], "swap", "20", "", 0..=2, false, false),
        boot(TOOLS_AFTER_RESUME, &[("resume", "UUID=5eed"), ("noresume", "y")], "swap", "20", "", 0..=2, false, false),
        // Run a second time, as some boot scripts run local-premount.
        Boot { noted_before: true, ..boot(TOOLS_AFTER_RESUME, RESUME, "swap", "20", "", 0..=2, false, true) },
        boot(DRACUT, &[], "exit", "5", "exited at start", 0..=5, true, false),
        boot(DRACUT, &[], "swap", "20", "nbd-vram: starting", 1..=10, true, true),
        boot(DRACUT, &[], "live", "", "NBD_VRAM_WAIT='' is no number of seconds; waiting 30", 30..=50, true, true),
        boot(DRACUT, &[("DRACUT_SYSTEMD", "1")], "live", "2", "not started from an initramfs that runs systemd", 0..=2, false, false),
    ];
    // The stand-in daemon, linked into each root: a copy would be open for
    // writing in this process, and a child another thread forks meanwhile
    // would keep it so until it execs, making the daemon's exec fail.
    let built = scratch("standin");
    let standin = built.join("nbd-vram");
    let cc = Command::new("cc").args(["-static", "-O2", "-Wall", "-o"]).arg(&standin).arg(Path::new(ROOT).join("tests/boot/standin.c")).output().expect("running cc");
    assert!(cc.status.success(), "cc tests/boot/standin.c: {}", String::from_utf8_lossy(&cc.stderr));
    let runs: Vec<_> = cases
        .into_iter()
        .enumerate()
        .map(|(i, case)| {
            let standin = standin.clone();
            std::thread::spawn(move || boot_script(&scratch(&format!("boot{i}")), busybox, &standin, case))
        })
        .collect();
    for run in runs {
        run.join().unwrap();
    }
    let _ = fs::remove_dir_all(built);
}

const TOOLS: &str = "dist/initramfs-tools/scripts/init-premount/nbd-vram";
const TOOLS_AFTER_RESUME: &str = "dist/initramfs-tools/scripts/local-premount/nbd-vram";
const DRACUT: &str = "dist/dracut/90nbd-vram/nbd-vram-start.sh";

/// A boot script's run: which, with what environment, the stand-in
/// daemon's behaviour (`tests/boot/standin.c`), NBD_VRAM_WAIT, what the
/// script says, how long it takes, whether it starts the daemon and notes
/// it for the units, and whether an earlier run noted one.
struct Boot {
    script: &'static str,
    env: &'static [(&'static str, &'static str)],
    daemon: &'static str,
    wait: &'static str,
    says: &'static str,
    secs: std::ops::RangeInclusive<u64>,
    starts: bool,
    noted: bool,
    noted_before: bool,
}

fn boot_script(root: &Path, busybox: &str, standin: &Path, case: Boot) {
    for dir in ["bin", "sbin", "usr/bin", "etc/default", "scripts/init-premount", "scripts/local-premount", "proc", "dev", "run"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for tool in ["sh", "sleep", "grep", "sed", "mkdir", "cat", "mknod", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    let script = |path: &str, text: &str| {
        fs::write(root.join(path), text).unwrap();
        fs::set_permissions(root.join(path), fs::Permissions::from_mode(0o755)).unwrap();
    };
    script("sbin/modprobe", "#!/bin/sh\nexit 1\n");
    // initramfs-tools' and dracut's message functions.
    script(
        "scripts/functions",
        "log_warning_msg() { echo \"warning: $*\"; }\nlog_failure_msg() { echo \"failure: $*\"; }\nlog_begin_msg() { echo \"$*\"; }\nlog_end_msg() { :; }\nwarn() { echo \"warning: $*\"; }\ninfo() { echo \"$*\"; }\n",
    );
    // The stand-in daemon: exits at once, lives without swap, or makes
    // its device swap after a second (in the file the script reads).
    fs::hard_link(standin, root.join("usr/bin/nbd-vram")).unwrap();
    fs::write(root.join("etc/standin"), case.daemon).unwrap();
    if case.noted_before {
        fs::create_dir_all(root.join("run/nbd-vram")).unwrap();
        fs::write(root.join("run/nbd-vram/initramfs"), "an earlier run's daemon").unwrap();
    }
    fs::write(root.join("proc/swaps"), "Filename Type Size Used Priority\n").unwrap();
    fs::write(root.join("etc/default/nbd-vram"), format!("NBD_VRAM_ARGS='--size 64 --device /dev/nbd0'\nNBD_VRAM_WAIT='{}'\n", case.wait)).unwrap();
    // Where initramfs-tools and dracut put them; the local-premount script
    // runs the init-premount one.
    let flavour = if case.script == DRACUT { DRACUT } else { TOOLS };
    fs::copy(Path::new(ROOT).join(flavour), root.join("scripts/init-premount/nbd-vram")).unwrap();
    fs::copy(Path::new(ROOT).join(TOOLS_AFTER_RESUME), root.join("scripts/local-premount/nbd-vram")).unwrap();

    // initramfs-tools runs its script; dracut sources its hook, after
    // its own library.
    let run = match case.script {
        TOOLS => "exec /bin/sh /scripts/init-premount/nbd-vram",
        TOOLS_AFTER_RESUME => "exec /bin/sh /scripts/local-premount/nbd-vram",
        _ => ". /scripts/functions; . /scripts/init-premount/nbd-vram",
    };
    let what = format!("{}: {}, NBD_VRAM_WAIT={:?}, {:?}", case.script, case.daemon, case.wait, case.env);
    let mut tries = 0;
    let (took, out) = loop {
        let started = std::time::Instant::now();
        let mut boot = Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-c", run])
            .env_clear()
            .env("PATH", "/sbin:/bin")
            .envs(case.env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while boot.try_wait().unwrap().is_none() {
            if started.elapsed().as_secs() > case.secs.end() + 30 {
                let _ = boot.kill();
                panic!("{what}: the boot script still waits after {} s", started.elapsed().as_secs());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = boot.wait_with_output().unwrap();
        // A process another thread forked while busybox was being copied
        // holds it open for writing until that process execs: exec then
        // fails (ETXTBSY) for a moment, before the script ran at all.
        tries += 1;
        if tries < 5 && out.status.code() == Some(126) && String::from_utf8_lossy(&out.stderr).contains("Text file busy") {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        break (started.elapsed().as_secs(), out);
    };
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let note = fs::read_to_string(root.join("run/nbd-vram/initramfs")).ok();
    if let Some(pid) = note.as_deref().and_then(|n| n.trim().parse::<i32>().ok()) {
        // SAFETY: a signal to the stand-in daemon the script started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(out.status.success(), "{what}: the boot script failed ({}): {said}", out.status);
    assert!(said.contains(case.says), "{what}: the boot script did not say {:?}: {said}", case.says);
    assert!(!case.says.is_empty() || said.is_empty(), "{what}: the boot script, which starts nothing, said: {said}");
    assert!(case.secs.contains(&took), "{what}: the boot script took {took} s, not {:?}: {said}", case.secs);
    assert_eq!(note.is_some(), case.noted, "{what}: noted {note:?}: {said}");
    // Started, the daemon is '@nbd-vram', which systemd's killing spree
    // at the end of shutdown spares (busybox's shell can name it so).
    let argv0 = fs::read_to_string(root.join("run/argv0")).ok();
    assert_eq!(argv0.as_deref(), case.starts.then_some("@nbd-vram"), "{what}: the daemon's argv[0]: {said}");
    let _ = fs::remove_dir_all(root);
}

