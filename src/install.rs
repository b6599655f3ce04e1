//! `kmsfs install-units`: the binary, mount(8) helpers, the systemd unit template and
//! /etc/kmsfs, under a root directory (for packaging and tests). `--package` lays them out as
//! a distribution package does; scripts/build-deb stages a .deb with it, so the package and a
//! local install ship the same files.

use crate::exit::Fatal;
use std::path::Path;

pub const SERVICE_TEMPLATE: &str = include_str!("../systemd/kmsfs@.service");
const CONF_EXAMPLE: &str = include_str!("../systemd/kmsfs.conf.example");
const LOGROTATE: &str = include_str!("../systemd/kmsfs.logrotate");
const CREDENTIALS_EXAMPLE: &str = include_str!("../systemd/kmsfs@.service.d/credentials.conf.example");

/// The unit template with `kmsfs` at `bin`.
pub fn service_unit(bin: &Path) -> String {
    SERVICE_TEMPLATE.replace("/usr/local/bin/kmsfs", &bin.display().to_string())
}

/// Where the unit and the shared files go.
pub struct Layout {
    /// The unit template's directory.
    units: &'static str,
    /// Man pages and completions go under it.
    share: &'static str,
    /// zsh's completion file under `share`: Debian's zsh looks in site-functions under
    /// /usr/local and in vendor-completions for packages.
    zsh: &'static str,
}

/// An admin's own install: /etc/systemd/system is the admin's, /usr/local the local software's.
pub const LOCAL: Layout = Layout {
    units: "etc/systemd/system",
    share: "usr/local/share",
    zsh: "zsh/site-functions/_kmsfs",
};

/// A distribution package: /etc/systemd/system and /usr/local are left to the admin.
pub const PACKAGE: Layout = Layout {
    units: "usr/lib/systemd/system",
    share: "usr/share",
    zsh: "zsh/vendor-completions/_kmsfs",
};

pub fn install_units(bin_dir: &Path, root: &Path, layout: &Layout, cli: clap::Command) -> Result<(), Fatal> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |what: &str, e: std::io::Error| Fatal::new(format!("install-units: {what}: {e}"));
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let bin = bin_dir.join("kmsfs");
    let staged_bin = under(&bin.to_string_lossy());
    std::fs::create_dir_all(staged_bin.parent().expect("has a parent")).map_err(|e| io("bin dir", e))?;
    let exe = std::env::current_exe().map_err(|e| io("own executable", e))?;
    if std::fs::canonicalize(&staged_bin).ok() != Some(exe.clone()) {
        let tmp = staged_bin.with_extension("new");
        std::fs::copy(&exe, &tmp).map_err(|e| io("copy binary", e))?;
        std::fs::rename(&tmp, &staged_bin).map_err(|e| io("install binary", e))?;
    }
    for helper in ["sbin/mount.kmsfs", "sbin/mount.fuse.kmsfs"] {
        let link = under(helper);
        std::fs::create_dir_all(link.parent().expect("has a parent")).map_err(|e| io("sbin", e))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&bin, &link).map_err(|e| io(helper, e))?;
    }
    let units = under(layout.units);
    std::fs::create_dir_all(units.join("kmsfs@.service.d")).map_err(|e| io("unit dir", e))?;
    std::fs::write(units.join("kmsfs@.service"), service_unit(&bin)).map_err(|e| io("unit", e))?;
    std::fs::write(
        units.join("kmsfs@.service.d/credentials.conf.example"),
        CREDENTIALS_EXAMPLE,
    )
    .map_err(|e| io("drop-in example", e))?;
    // Where man(1) and the shells look.
    let share = under(layout.share);
    crate::docs::man_pages(cli.clone(), &share.join("man/man1"))?;
    for (shell, path) in [
        (clap_complete::Shell::Bash, "bash-completion/completions/kmsfs"),
        (clap_complete::Shell::Zsh, layout.zsh),
        (clap_complete::Shell::Fish, "fish/vendor_completions.d/kmsfs.fish"),
    ] {
        let p = share.join(path);
        std::fs::create_dir_all(p.parent().expect("has a parent")).map_err(|e| io(path, e))?;
        std::fs::write(&p, crate::docs::completions(cli.clone(), shell)).map_err(|e| io(path, e))?;
    }
    let logrotate = under("etc/logrotate.d");
    std::fs::create_dir_all(&logrotate).map_err(|e| io("/etc/logrotate.d", e))?;
    std::fs::write(logrotate.join("kmsfs"), LOGROTATE).map_err(|e| io("logrotate snippet", e))?;
    let etc = under("etc/kmsfs");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(etc.join("credentials"))
        .map_err(|e| io("/etc/kmsfs", e))?;
    let example = etc.join("example.conf.example");
    if !example.exists() {
        std::fs::write(&example, CONF_EXAMPLE).map_err(|e| io("config example", e))?;
    }
    println!(
        "installed {} and mount.kmsfs / mount.fuse.kmsfs helpers",
        bin.display()
    );
    println!("unit: /{}/kmsfs@.service; now:", layout.units);
    println!("  systemctl daemon-reload");
    println!("  cp /etc/kmsfs/example.conf.example /etc/kmsfs/NAME.conf && $EDITOR /etc/kmsfs/NAME.conf");
    println!("  systemctl enable --now kmsfs@NAME");
    Ok(())
}
