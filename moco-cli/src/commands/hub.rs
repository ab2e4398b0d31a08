//! The Hugging Face Hub: `hf://OWNER/NAME[@REVISION]` weights through hf-hub's standard cache
//! (`HF_HUB_CACHE`, `HF_HOME/hub`, or `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` reads the
//! cache only), and `moco push`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::HFClient;

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Splits `hf://OWNER/NAME[@REVISION]`.
pub fn parse(arg: &str) -> Result<(String, String, Option<String>)> {
    let rest = arg
        .strip_prefix("hf://")
        .ok_or_else(|| anyhow!("{arg}: not an hf:// reference"))?;
    let (repo, rev) = match rest.split_once('@') {
        Some((r, v)) if !v.is_empty() => (r, Some(v.to_string())),
        Some(_) => bail!("{arg}: empty revision after `@`"),
        None => (rest, None),
    };
    match repo.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => {
            Ok((o.to_string(), n.to_string(), rev))
        }
        _ => bail!("{arg}: expected hf://OWNER/NAME[@REVISION]"),
    }
}

/// A local path for `--weights`: the argument itself, or for `hf://` the `model.safetensors` of
/// that repository in the hub cache (downloaded first unless `HF_HUB_OFFLINE` is set).
pub fn resolve_weights(arg: &str) -> Result<PathBuf> {
    if !arg.starts_with("hf://") {
        return Ok(PathBuf::from(arg));
    }
    let (owner, name, rev) = parse(arg)?;
    let client = HFClient::builder()
        .build_sync()
        .with_context(|| format!("--weights {arg}: cannot set up the hub client"))?;
    let repo = client.model(owner, name);
    repo.download_file()
        .filename("model.safetensors")
        .maybe_revision(rev)
        .local_files_only(offline())
        .send()
        .map_err(|e| {
            let how = if offline() {
                " (HF_HUB_OFFLINE is set: only the local cache was searched)"
            } else {
                ""
            };
            anyhow!("--weights {arg}: cannot get model.safetensors{how}: {e}")
        })
}

/// `moco push DIR --repo OWNER/NAME`: uploads the folder written by `moco export` in one commit.
pub fn push(dir: &Path, repo: &str, private: bool, revision: Option<String>) -> Result<()> {
    for f in ["model.safetensors", "config.json", "README.md"] {
        if !dir.join(f).is_file() {
            bail!("{}: no {f}; run `moco export` first", dir.display());
        }
    }
    let (owner, name) = repo
        .split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty())
        .ok_or_else(|| anyhow!("--repo {repo}: expected OWNER/NAME"))?;
    if offline() {
        bail!("HF_HUB_OFFLINE is set: cannot push to the hub");
    }
    let token_file = hf_hub::hf_home().join("token");
    let has_token =
        std::env::var("HF_TOKEN").is_ok_and(|t| !t.trim().is_empty()) || token_file.is_file();
    if !has_token {
        bail!(
            "no Hugging Face token: set HF_TOKEN or log in (token file {}); nothing was uploaded",
            token_file.display()
        );
    }
    let client = HFClient::builder()
        .build_sync()
        .context("cannot set up the hub client")?;
    client
        .create_repository()
        .repo_id(repo)
        .repo_type(hf_hub::repository::RepoTypeModel)
        .private(private)
        .exist_ok(true)
        .send()
        .with_context(|| format!("--repo {repo}: cannot create the repository (network, token rights?); nothing was uploaded"))?;
    let info = client
        .model(owner, name)
        .upload_folder()
        .folder_path(dir.to_path_buf())
        .maybe_revision(revision)
        .commit_message("Upload MoCo encoder exported by moco-rs")
        .send()
        .with_context(|| {
            format!("--repo {repo}: upload failed (after hf-hub's retries of transient errors); the Hub applies a commit whole or not at all, so no commit was made: run the same push again")
        })?;
    // The commit's own address: the endpoint is HF_ENDPOINT's when that is set.
    let at = info
        .commit_url
        .unwrap_or_else(|| format!("https://huggingface.co/{repo}"));
    println!("pushed {} to {repo} in one commit: {at}", dir.display());
    Ok(())
}

/// Upload a folder written by `moco export` to the Hugging Face Hub (token: HF_TOKEN or the
/// standard token file).
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The exported folder.
    pub dir: PathBuf,
    /// OWNER/NAME.
    #[arg(long)]
    pub repo: String,
    /// Create the repository private.
    #[arg(long)]
    pub private: bool,
    /// Branch to commit to.
    #[arg(long)]
    pub revision: Option<String>,
}

impl PushArgs {
    /// Uploads the folder.
    pub fn run(&self) -> Result<()> {
        push(&self.dir, &self.repo, self.private, self.revision.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(parse("hf://a/b").unwrap(), ("a".into(), "b".into(), None));
        assert_eq!(
            parse("hf://a/b@v1").unwrap(),
            ("a".into(), "b".into(), Some("v1".into()))
        );
        assert!(parse("hf://a").is_err());
        assert!(parse("hf://a/b/c").is_err());
        assert!(parse("hf://a/b@").is_err());
    }
}
