//! The shared config and credentials files (`~/.aws/config`, `~/.aws/credentials`) as AWS tools
//! read them: INI sections, `[NAME]` in the credentials file and `[profile NAME]` (or
//! `[default]`) in the config file, `key = value` lines, `#` and `;` comments. Pure: text in,
//! settings out.

use std::collections::HashMap;

/// One profile's settings, keys lowercased.
pub(super) type Profile = HashMap<String, String>;

/// The profile `name` of a credentials file (`config == false`) or a config file.
pub(super) fn section(text: &str, name: &str, config: bool) -> Option<Profile> {
    let mut current: Option<bool> = None;
    let mut found: Option<Profile> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let header = header.trim();
            let this = if config && name != "default" {
                header
                    .strip_prefix("profile")
                    .filter(|r| r.starts_with(char::is_whitespace))
                    .map(str::trim)
            } else if config {
                // `[default]` or `[profile default]`.
                Some(header.strip_prefix("profile ").map(str::trim).unwrap_or(header))
            } else {
                Some(header)
            };
            let matches = this == Some(name);
            if matches && found.is_none() {
                found = Some(Profile::new());
            }
            current = Some(matches);
            continue;
        }
        if current != Some(true) {
            continue;
        }
        if let (Some((k, v)), Some(p)) = (line.split_once('='), found.as_mut()) {
            let v = v.split(" #").next().unwrap_or(v).split(" ;").next().unwrap_or(v);
            p.entry(k.trim().to_ascii_lowercase())
                .or_insert_with(|| v.trim().to_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: &str = "\
# a comment
[default]
aws_access_key_id = AKIADEFAULT
aws_secret_access_key = secret/default

[team]
aws_access_key_id=AKIATEAM ; trailing comment
aws_secret_access_key=secret+team
aws_session_token = FwoGZXIvYXdzE
";

    const CONFIG: &str = "\
[default]
region = eu-west-1

[profile team]
region = us-east-2
role_arn = arn:aws:iam::111122223333:role/kmsfs
web_identity_token_file = /var/run/secrets/token

[team]
region = not-this-one
";

    #[test]
    fn profiles_are_found_by_name_in_each_file() {
        let d = section(CREDENTIALS, "default", false).unwrap();
        assert_eq!(d["aws_access_key_id"], "AKIADEFAULT");
        assert_eq!(d["aws_secret_access_key"], "secret/default");
        let t = section(CREDENTIALS, "team", false).unwrap();
        assert_eq!(t["aws_access_key_id"], "AKIATEAM");
        assert_eq!(t["aws_session_token"], "FwoGZXIvYXdzE");
        assert!(section(CREDENTIALS, "nope", false).is_none());

        assert_eq!(section(CONFIG, "default", true).unwrap()["region"], "eu-west-1");
        let t = section(CONFIG, "team", true).unwrap();
        assert_eq!(
            t["region"], "us-east-2",
            "[team] in the config file is not profile team"
        );
        assert_eq!(t["web_identity_token_file"], "/var/run/secrets/token");
        assert!(section(CONFIG, "profile", true).is_none());
    }
}
