//! Secrets from files: a credential the mount reads from a file (a token file, a systemd
//! credential, a shared credentials file) must be a regular file that only its owner may read.

use crate::kms::KmsError;
use std::path::Path;
use zeroize::Zeroizing;

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
}
