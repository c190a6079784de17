//! The data directory is the gateway's alone: it holds the registry (with the JWT signing key
//! and credential hashes), buffered device data and profiles. [`secure`] runs first at
//! start-up and makes it owner-only:
//!
//! - the process umask becomes `077`, so every file and directory the gateway creates from
//!   then on (registry, buffer segments and ack files, file-sink output, profiles) is 0600 /
//!   0700 whatever umask it was started with;
//! - the data dir is created 0700;
//! - every existing entry under it that grants anything to group or others is tightened (the
//!   group and other bits removed), each with a log line naming the path. Symbolic links are
//!   not followed.

use std::path::Path;

/// Log at most this many tightened paths one by one; the rest are counted in one line.
const MAX_LOGGED: usize = 50;
/// Deepest directory level visited under the data dir (ours are 3 deep).
const MAX_DEPTH: usize = 16;

/// Sets the umask to `077`, creates `data_dir` 0700 and tightens what is already in it.
pub fn secure(data_dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(data_dir).map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("cannot create data_dir {}: {err}", data_dir.display()),
        )
    })?;
    #[cfg(unix)]
    {
        let mut tightened = 0;
        tighten(data_dir, 0, &mut tightened)?;
        if tightened > MAX_LOGGED {
            tracing::warn!(
                path = %data_dir.display(),
                count = tightened,
                "tightened the permissions of {} more entries under the data dir",
                tightened - MAX_LOGGED
            );
        }
    }
    Ok(())
}

/// Removes group and other permissions from `path` and, for a directory, everything below it.
#[cfg(unix)]
fn tighten(path: &Path, depth: usize, tightened: &mut usize) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let context = |err: std::io::Error| {
        std::io::Error::new(
            err.kind(),
            format!("cannot tighten permissions of {}: {err}", path.display()),
        )
    };
    let metadata = std::fs::symlink_metadata(path).map_err(context)?;
    if metadata.file_type().is_symlink() {
        return Ok(());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let owner_only = mode & 0o700;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(owner_only))
            .map_err(context)?;
        *tightened += 1;
        if *tightened <= MAX_LOGGED {
            tracing::warn!(
                path = %path.display(),
                from = format_args!("{mode:04o}"),
                to = format_args!("{owner_only:04o}"),
                "tightened permissions: the data dir is for the gateway's user only"
            );
        }
    }
    if metadata.is_dir() && depth < MAX_DEPTH {
        for entry in std::fs::read_dir(path).map_err(context)? {
            tighten(&entry.map_err(context)?.path(), depth + 1, tightened)?;
        }
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap_or_else(|err| panic!("{err}"))
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn loose_entries_are_tightened_and_links_left_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
        let data = dir.path().join("data");
        let sinks = data.join("sinks").join("cloud");
        std::fs::create_dir_all(&sinks).unwrap_or_else(|err| panic!("{err}"));
        let segment = sinks.join("00000001.seg");
        std::fs::write(&segment, b"x").unwrap_or_else(|err| panic!("{err}"));
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"x").unwrap_or_else(|err| panic!("{err}"));
        std::os::unix::fs::symlink(&outside, data.join("link"))
            .unwrap_or_else(|err| panic!("{err}"));
        for (path, loose) in [
            (&data, 0o755),
            (&sinks, 0o775),
            (&segment, 0o644),
            (&outside, 0o644),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(loose))
                .unwrap_or_else(|err| panic!("{err}"));
        }
        secure(&data).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&sinks), 0o700);
        assert_eq!(mode(&segment), 0o600);
        assert_eq!(mode(&outside), 0o644, "a link target outside is not ours");
    }
}
