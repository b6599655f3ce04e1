//! Where a network backend's mount-side settings come from: variables (the process
//! environment, or a map in tests), systemd credentials (`$CREDENTIALS_DIRECTORY`) and files
//! that only their owner may read ([`read_secret_file`]). Never the backing directory.

use crate::kms::KmsError;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Where settings are looked up by name: the process environment, or a map in tests.
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as [`Vars`].
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The first of `names` that is set and not empty.
pub(crate) fn first(vars: Vars<'_>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| vars(n).filter(|v| !v.is_empty()))
}

/// Reads a secret from a file that only its owner may read: opened without following a
/// symlink, then checked on the open descriptor (owner: us or root; no group/other access).
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, KmsError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let bad = |e: &dyn std::fmt::Display| {
        KmsError::Misconfigured(format!("credential file {}: {e}", path.display()))
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(&e))?;
    let meta = f.metadata().map_err(|e| bad(&e))?;
    if !meta.is_file() || (meta.uid() != 0 && meta.uid() != crate::sys::geteuid()) {
        return Err(bad(
            &"must be a regular file owned by root or by the user running kmsfs",
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(KmsError::Misconfigured(format!(
            "credential file {} is readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(16 * 1024).read_to_end(&mut bytes).map_err(|e| bad(&e))?;
    let s = std::str::from_utf8(&bytes)
        .map_err(|_| KmsError::Misconfigured(format!("credential file {} is not text", path.display())))?;
    Ok(Zeroizing::new(s.trim().to_owned()))
}

/// A file named by the first of `names` that is set, or else `$CREDENTIALS_DIRECTORY/<credential>`
/// if that exists (systemd's `LoadCredential=`).
pub(crate) fn file_setting(vars: Vars<'_>, names: &[&str], credential: &str) -> Option<PathBuf> {
    if let Some(f) = first(vars, names) {
        return Some(PathBuf::from(f));
    }
    let dir = PathBuf::from(vars("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty())?);
    Some(dir.join(credential)).filter(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_files_must_be_private_regular_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("bao-token");
        std::fs::write(&file, " s.private \n").expect("write");
        let chmod = |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode));
        chmod(0o600).expect("chmod");
        let token = read_secret_file(&file).expect("a private file");
        assert_eq!(token.as_str(), "s.private");

        chmod(0o640).expect("chmod");
        let e = read_secret_file(&file).err();
        assert!(
            matches!(&e, Some(KmsError::Misconfigured(m)) if m.contains("chmod 600")),
            "{e:?}"
        );

        // Neither a symlink (even to a private file) nor a directory.
        chmod(0o600).expect("chmod");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        for path in [&link, &dir.path().to_owned()] {
            let e = read_secret_file(path).err();
            assert!(
                matches!(&e, Some(KmsError::Misconfigured(_))),
                "{}: {e:?}",
                path.display()
            );
        }
    }

    #[test]
    fn file_settings_come_from_variables_then_systemd_credentials() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("kmip-cert.pem"), "x").expect("write");
        let d = dir.path().to_str().unwrap().to_owned();
        let vars = |map: Vec<(&'static str, String)>| {
            move |n: &str| map.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone())
        };
        let both = vars(vec![
            ("CERT", "/etc/c.pem".into()),
            ("CREDENTIALS_DIRECTORY", d.clone()),
        ]);
        assert_eq!(
            file_setting(&both, &["CERT"], "kmip-cert.pem"),
            Some("/etc/c.pem".into())
        );
        let creds = vars(vec![("CREDENTIALS_DIRECTORY", d.clone())]);
        assert_eq!(
            file_setting(&creds, &["CERT"], "kmip-cert.pem"),
            Some(dir.path().join("kmip-cert.pem"))
        );
        assert_eq!(file_setting(&creds, &["KEY"], "kmip-key.pem"), None);
    }
}
