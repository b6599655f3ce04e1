//! `mount.kmsfs` / `mount.fuse.kmsfs`: the helper mount(8) runs for `mount -t fuse.kmsfs SRC
//! DIR -o OPTIONS` (and so for /etc/fstab and systemd .mount units). It turns the mount(8)
//! calling convention into a `kmsfs mount` command line.

/// Options mount(8), systemd and fstab conventions pass that mean nothing to kmsfs.
fn ignored(opt: &str) -> bool {
    matches!(
        opt,
        "defaults"
            | "_netdev"
            | "nofail"
            | "auto"
            | "noauto"
            | "relatime"
            | "norelatime"
            | "strictatime"
            | "lazytime"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
}

/// FUSE and VFS options `kmsfs mount -o` takes as they are.
const PASSED: &[&str] = &[
    "ro",
    "rw",
    "allow_other",
    "allow_root",
    "default_permissions",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "sync",
    "async",
    "dirsync",
    "nonempty",
];

/// kmsfs's own options (`name=value`), mapped to `kmsfs mount` flags.
const VALUED: &[(&str, &str)] = &[
    ("log", "--log-file"),
    ("metrics", "--metrics"),
    ("audit", "--audit-log"),
    ("policy", "--policy"),
    ("check_interval", "--check-interval"),
    ("grace", "--grace"),
    ("key_ttl", "--key-ttl"),
    ("key_cache", "--key-cache"),
    ("threads", "--threads"),
    ("prefetch", "--prefetch"),
    ("anchor", "--anchor"),
];

/// The `kmsfs` arguments for a mount(8)-style call, and environment files to load
/// (`env=FILE`: KMS settings and credential file paths, one `NAME=value` per line).
pub fn translate(args: &[String]) -> Result<(Vec<String>, Vec<String>), String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut sloppy = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options.extend(
                it.next()
                    .ok_or("-o needs a value")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            // mount(8)'s own flags: no mtab, fake, verbose; sloppy tolerates unknown options.
            "-n" | "-f" | "-v" => {}
            "-s" => sloppy = true,
            "-N" => return Err("mounting in another namespace (-N) is not supported".into()),
            s if s.starts_with("-o") => options.extend(s[2..].split(',').map(str::to_owned)),
            s if s.starts_with('-') => return Err(format!("unknown flag {s}")),
            s => positional.push(s.to_owned()),
        }
    }
    let [src, dir] = positional.as_slice() else {
        return Err("usage: mount.kmsfs BACKING MOUNTPOINT [-o OPTIONS]".into());
    };
    let mut out = vec!["mount".to_owned(), src.clone(), dir.clone()];
    let mut pass = Vec::new();
    let mut env_files = Vec::new();
    for opt in options {
        if ignored(&opt) {
            continue;
        }
        if PASSED.contains(&opt.as_str()) {
            pass.push(opt);
            continue;
        }
        if opt == "require_mlock" {
            out.push("--require-mlock".into());
            continue;
        }
        let (name, value) = opt.split_once('=').unwrap_or((&opt, ""));
        if name == "env" && !value.is_empty() {
            env_files.push(value.to_owned());
            continue;
        }
        match VALUED.iter().find(|(n, _)| *n == name) {
            Some((_, flag)) if !value.is_empty() => {
                out.push((*flag).to_owned());
                out.push(value.to_owned());
            }
            _ if sloppy => log::warn!("ignoring unknown mount option {opt:?} (sloppy mode)"),
            _ => return Err(format!("unknown mount option {opt:?}")),
        }
    }
    if !pass.is_empty() {
        out.push("-o".into());
        out.push(pass.join(","));
    }
    Ok((out, env_files))
}

/// Loads `NAME=value` lines (comments and blanks skipped) into the environment. The file
/// decides which KMS the mount trusts, so only its owner (root) may be able to change it.
pub fn load_env_file(path: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if meta.mode() & 0o022 != 0 || (meta.uid() != 0 && meta.uid() != crate::sys::geteuid()) {
        return Err(format!(
            "{path}: must be owned by root and not writable by group or others"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("{path}: not NAME=value: {line}"))?;
        crate::sys::set_env_single_threaded(k.trim(), v.trim().trim_matches('"'));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::translate;

    fn t(args: &[&str]) -> Result<Vec<String>, String> {
        translate(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map(|(a, _)| a)
    }

    #[test]
    fn fstab_options() {
        assert_eq!(
            t(&[
                "/srv/v",
                "/mnt/v",
                "-o",
                "rw,_netdev,nofail,x-systemd.automount,allow_other,grace=60,log=/var/log/v.log,anchor=/etc/kmsfs/v.json"
            ])
            .unwrap(),
            [
                "mount",
                "/srv/v",
                "/mnt/v",
                "--grace",
                "60",
                "--log-file",
                "/var/log/v.log",
                "--anchor",
                "/etc/kmsfs/v.json",
                "-o",
                "rw,allow_other"
            ]
        );
        assert_eq!(t(&["-n", "a", "b"]).unwrap(), ["mount", "a", "b"]);
    }

    #[test]
    fn unknown_options_are_refused() {
        assert!(
            t(&["a", "b", "-o", "frobnicate"])
                .unwrap_err()
                .contains("unknown mount option")
        );
        assert!(t(&["a", "b", "-o", "grace="]).is_err());
        assert!(t(&["a"]).is_err());
        assert!(t(&["a", "b", "-x"]).is_err());
    }
}
