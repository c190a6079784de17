//! Build information for `fieldgate --version`: the git commit, the target triple,
//! whether the C runtime is linked statically, and the enabled cargo features.
//!
//! The commit comes from `git` when the source is a git checkout (CI builds from a clean
//! clone) and is `unknown` otherwise, e.g. when built from a source tarball.

use std::process::Command;

fn main() {
    println!("cargo:rustc-env=FIELDGATE_COMMIT={}", commit());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned());
    let crt_static = std::env::var("CARGO_CFG_TARGET_FEATURE")
        .is_ok_and(|features| features.split(',').any(|feature| feature == "crt-static"));
    let linkage = if crt_static { "static" } else { "dynamic" };
    println!("cargo:rustc-env=FIELDGATE_TARGET={target} ({linkage})");
    println!("cargo:rustc-env=FIELDGATE_FEATURES={}", features());
    for path in git_paths() {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// The short commit hash of HEAD, or `unknown` without git or outside a checkout.
fn commit() -> String {
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}

/// Enabled cargo features, comma-separated, or `none` (the `default` set itself is not
/// named; the features it enables are).
fn features() -> String {
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(key, _)| {
            key.strip_prefix("CARGO_FEATURE_")
                .map(|name| name.to_lowercase().replace('_', "-"))
        })
        // `default` is a set, not a feature: its members are listed themselves.
        .filter(|name| name != "default")
        .collect();
    features.sort();
    if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(",")
    }
}

/// Files whose change means HEAD moved: HEAD itself, the branch it points to, and
/// packed refs (a worktree keeps its HEAD apart from the shared refs; `--git-path`
/// resolves both).
fn git_paths() -> Vec<String> {
    let mut names = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        names.push(branch);
    }
    names
        .iter()
        .filter_map(|name| git(&["rev-parse", "--git-path", name]))
        .filter(|path| std::path::Path::new(path).exists())
        .collect()
}

/// Runs git in the crate's directory; its trimmed stdout when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}
