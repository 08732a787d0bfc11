//! Embeds the git commit the binaries are built from (`envoy-sidecar --version`,
//! `envoy-sidecar-runc --version`, `doctor`): `ENVOY_SIDECAR_COMMIT`, 12 hex digits,
//! or `unknown` outside a git checkout (a source tarball). Set the variable in the
//! environment to override it (a package build from an exported tree).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ENVOY_SIDECAR_COMMIT");
    let commit = std::env::var("ENVOY_SIDECAR_COMMIT")
        .ok()
        .or_else(git_commit);
    println!(
        "cargo:rustc-env=ENVOY_SIDECAR_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}

fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Rebuild when HEAD moves: HEAD itself, the branch it names, packed refs.
    let dir = git(&["rev-parse", "--absolute-git-dir"])?;
    println!("cargo:rerun-if-changed={dir}/HEAD");
    println!("cargo:rerun-if-changed={dir}/packed-refs");
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed={dir}/{r}");
    }
    git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty())
}
