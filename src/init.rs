//! `kmsfs init`: a new volume in an empty directory, its KMS proven to work first.

use crate::anchor::Anchor;
use crate::exit::Fatal;
use crate::format::block::BlockLayout;
use crate::format::config::{CONFIG_FILE_NAME, KmsConfig, NamesConfig, VolumeConfig, WrappedKeyConfig};
use crate::kms::Binding;
use crate::kms::local::Keystore;
use crate::volume::explain_kms;
use std::path::{Path, PathBuf};

fn absolute(p: &Path) -> Result<PathBuf, Fatal> {
    std::path::absolute(p).map_err(|e| Fatal::new(format!("{}: {e}", p.display())))
}

fn default_keystore(backing: &Path) -> Result<PathBuf, Fatal> {
    let backing = absolute(backing)?;
    let name = backing
        .file_name()
        .ok_or_else(|| Fatal::new(format!("{} has no directory name", backing.display())))?;
    let mut file = name.to_os_string();
    file.push(".keystore");
    Ok(backing.with_file_name(file))
}

/// Where the new volume's keys will live.
pub enum InitKms {
    Local {
        keystore: Option<PathBuf>,
        key: String,
    },
    OpenBao {
        addrs: String,
        key: String,
        mount: String,
    },
    /// A KMIP key manager: `addrs` comma-separated `HOST:PORT`, `key` a Name or Unique Identifier.
    Kmip {
        addrs: String,
        key: String,
    },
    /// AWS KMS: the key (id, ARN or alias); the region is the environment's or the ARN's.
    AwsKms {
        key: String,
    },
}

/// Makes a volume in `backing` whose keys `kms` holds, with blocks of `layout`.
pub fn init(backing: &Path, kms: InitKms, plaintext_names: bool, layout: BlockLayout) -> Result<(), Fatal> {
    if backing.join(CONFIG_FILE_NAME).exists() {
        return Err(Fatal::new(format!(
            "{} is already a kmsfs volume",
            backing.display()
        )));
    }
    match std::fs::read_dir(backing) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(Fatal::new(format!(
                    "{} is not empty; kmsfs initialises only an empty or new directory",
                    backing.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(backing)
                .and_then(|()| crate::durable::sync_parent(backing))
                .map_err(|e| Fatal::new(format!("cannot create {}: {e}", backing.display())))?;
        }
        Err(e) => return Err(Fatal::new(format!("{}: {e}", backing.display()))),
    }
    let backing =
        std::fs::canonicalize(backing).map_err(|e| Fatal::new(format!("{}: {e}", backing.display())))?;
    let (kms_config, about) = match kms {
        InitKms::Local { keystore, key } => {
            let keystore = match keystore {
                Some(k) => absolute(&k)?,
                None => default_keystore(&backing)?,
            };
            if keystore.starts_with(&backing) {
                return Err(Fatal::new(
                    "the keystore must not live inside the backing directory: whoever holds the ciphertext would hold the keys",
                ));
            }
            let mut store = if keystore.exists() {
                Keystore::load(&keystore).map_err(explain_kms)?
            } else {
                Keystore::default()
            };
            let created_key = store.key(&key).is_none();
            if created_key {
                store.create_key(&key).map_err(Fatal::new)?;
                store
                    .save(&keystore)
                    .map_err(|e| Fatal::new(format!("cannot write keystore {}: {e}", keystore.display())))?;
            }
            let about = format!(
                "keystore: {} (key {key:?}{}) — back it up and keep it off the backing storage: without it the data is lost",
                keystore.display(),
                if created_key { ", created" } else { "" }
            );
            (KmsConfig::Local { keystore, key }, about)
        }
        InitKms::OpenBao { addrs, key, mount } => {
            let addrs: Vec<String> = addrs
                .split(',')
                .map(|a| a.trim().trim_end_matches('/').to_owned())
                .collect();
            let about = format!("KMS: OpenBao Transit key {key:?} at {}", addrs.join(", "));
            (KmsConfig::Openbao { addrs, mount, key }, about)
        }
        InitKms::Kmip { addrs, key } => {
            let addrs = crate::kms::kmip::parse_addrs(&addrs);
            let about = format!("KMS: KMIP key {key:?} at {}", addrs.join(", "));
            (KmsConfig::Kmip { addrs, key }, about)
        }
        InitKms::AwsKms { key } => {
            let region = crate::kms::aws::init_region(&key).map_err(explain_kms)?;
            let about = format!("KMS: AWS KMS key {key:?} in {region}");
            (KmsConfig::AwsKms { key, region }, about)
        }
    };
    let mut config = VolumeConfig::new(kms_config);
    config.block_size = layout.block_size();
    // Prove the key works before the volume exists, and have it wrap the volume name key.
    let rt = crate::volume::cli_runtime()?;
    let kms = crate::volume::key_provider(&config.kms, true, rt.handle()).map_err(explain_kms)?;
    rt.block_on(kms.check_access()).map_err(explain_kms)?;
    if !plaintext_names {
        let (_name_key, wrapped) = rt
            .block_on(kms.generate(&Binding::volume(config.volume_id())))
            .map_err(explain_kms)?;
        let mut root_id = [0u8; crate::format::name::DIR_ID_LEN];
        crate::crypto::fill_random(&mut root_id);
        config.names = NamesConfig::Encrypted {
            root_dir_id: crate::hex::encode(&root_id),
            key_ref: wrapped.key_ref,
            wrapped_key: crate::hex::encode(&wrapped.blob),
        };
    }
    // The volume key authenticates the config: every volume has one, plaintext names too.
    let (volume_key, wrapped) = rt
        .block_on(kms.generate(&Binding::volume(config.volume_id())))
        .map_err(explain_kms)?;
    config.volume_key = Some(WrappedKeyConfig {
        key_ref: wrapped.key_ref,
        wrapped: crate::hex::encode(&wrapped.blob),
    });
    config.seal(&volume_key);
    drop(volume_key);
    // The mount side's record first: a config without it would not mount.
    let anchor_path = crate::anchor::path_for(&backing);
    crate::anchor::save(&anchor_path, &Anchor::for_config(&backing, &config))?;
    crate::durable::atomic_write(&backing.join(CONFIG_FILE_NAME), &config.encode(), 0o644)
        .map_err(|e| Fatal::new(format!("cannot write volume config: {e}")))?;
    let names = if plaintext_names {
        "plaintext names"
    } else {
        "encrypted names"
    };
    println!(
        "initialised volume {} in {} ({names}, {} blocks)",
        config.volume_id,
        backing.display(),
        crate::format::block::human_block_size(layout.block_size())
    );
    println!("{about}");
    println!(
        "this machine's settings for it: {} (which KMS and key; the backing directory is never trusted for that)",
        anchor_path.display()
    );
    Ok(())
}

/// Asks on the terminal whether to record what `anchor` showed; without a terminal, only
/// `--yes` records.
fn confirm(yes: bool) -> Result<(), Fatal> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Fatal::new(
            "not recorded: check that the settings above are the volume's KMS and key, then run again with --yes",
        ));
    }
    print!("record these as this machine's settings for the volume? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    match answer.trim() {
        "y" | "Y" | "yes" | "YES" | "Yes" => Ok(()),
        _ => Err(Fatal::new("not recorded")),
    }
}

/// `kmsfs anchor BACKING`: records on this machine which KMS and key a volume made elsewhere
/// (or before anchors existed) uses, after the admin has seen them; authenticates its config
/// if it is not yet (adds a volume key and a MAC).
pub fn anchor(backing: &Path, replace: bool, yes: bool) -> Result<(), Fatal> {
    let (backing, mut config) = crate::volume::read(backing)?;
    let anchor_path = crate::anchor::path_for(&backing);
    if !replace && crate::anchor::load(&anchor_path)?.is_some() {
        return Err(Fatal::new(format!(
            "{} already has settings for this volume ({}); give --replace to record the config's again",
            anchor_path.display(),
            backing.display()
        )));
    }
    let names = match &config.names {
        NamesConfig::Encrypted { .. } => "encrypted",
        NamesConfig::Plaintext => "PLAINTEXT",
    };
    match &config.kms {
        KmsConfig::Local { keystore, key } => {
            println!(
                "volume {}: local keystore {} key {key:?}; names {names}",
                config.volume_id,
                keystore.display()
            )
        }
        KmsConfig::Openbao { addrs, mount, key } => println!(
            "volume {}: OpenBao Transit {mount}/{key} at {}; names {names}",
            config.volume_id,
            addrs.join(", ")
        ),
        KmsConfig::Kmip { addrs, key } => println!(
            "volume {}: KMIP key {key:?} at {}; names {names}",
            config.volume_id,
            addrs.join(", ")
        ),
        KmsConfig::AwsKms { key, region } => println!(
            "volume {}: AWS KMS key {key} in {region}; names {names}",
            config.volume_id
        ),
    }
    match &config.volume_key {
        Some(_) => println!(
            "format {}, {} blocks; the config is authenticated (checked before recording)",
            config.format_version,
            crate::format::block::human_block_size(config.block_size)
        ),
        // What stripping a newer volume's MAC would also look like: say so before the answer.
        None => println!(
            "format {}; the config is NOT authenticated: only volumes made before kmsfs \
             authenticated configs lack it; if this volume was made since, its config was \
             altered: do not confirm",
            config.format_version
        ),
    }
    crate::volume::check_kms_location(&config.kms, &backing)?;
    // Trust on first use: what was shown comes from the backing directory, which may be
    // hostile. The admin says it is the volume's KMS and key before it becomes the anchor.
    confirm(yes)?;
    let rt = crate::volume::cli_runtime()?;
    let kms = crate::volume::key_provider(&config.kms, false, rt.handle()).map_err(explain_kms)?;
    rt.block_on(kms.check_access()).map_err(explain_kms)?;
    let binding = Binding::volume(config.volume_id());
    match &config.volume_key {
        Some(k) => {
            let wrapped = crate::kms::WrappedDek {
                key_ref: k.key_ref.clone(),
                blob: crate::hex::decode(&k.wrapped).unwrap_or_default(),
            };
            let key = rt.block_on(kms.unwrap(&wrapped, &binding)).map_err(explain_kms)?;
            if !config.mac_matches(&key) {
                return Err(Fatal::new(format!(
                    "the volume config in {} fails its authentication: not recording it",
                    backing.display()
                )));
            }
        }
        None => {
            let (key, wrapped) = rt.block_on(kms.generate(&binding)).map_err(explain_kms)?;
            config.volume_key = Some(WrappedKeyConfig {
                key_ref: wrapped.key_ref,
                wrapped: crate::hex::encode(&wrapped.blob),
            });
            config.seal(&key);
        }
    }
    // The name key must unwrap too, or the recorded KMS is not this volume's.
    if let NamesConfig::Encrypted {
        key_ref, wrapped_key, ..
    } = &config.names
    {
        let wrapped = crate::kms::WrappedDek {
            key_ref: key_ref.clone(),
            blob: crate::hex::decode(wrapped_key).unwrap_or_default(),
        };
        rt.block_on(kms.unwrap(&wrapped, &binding)).map_err(explain_kms)?;
    }
    crate::anchor::save(&anchor_path, &Anchor::for_config(&backing, &config))?;
    crate::durable::atomic_write(&backing.join(CONFIG_FILE_NAME), &config.encode(), 0o644)
        .map_err(|e| Fatal::new(format!("cannot write volume config: {e}")))?;
    println!(
        "recorded in {}; the config is authenticated",
        anchor_path.display()
    );
    Ok(())
}
