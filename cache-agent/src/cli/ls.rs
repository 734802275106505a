//! `vmdisk-cache-agent ls`: what the cache holds, newest use first, as a table for people or
//! as JSON, and the images refused for having killed their warms (`--forget` lets one be
//! warmed again).

use super::setup::{open_store, OpenAs};
use super::CacheArgs;
use crate::store::{CacheEntry, CacheStore};

pub(super) fn execute(cache: &CacheArgs, json: bool, forget: Option<&str>) -> anyhow::Result<()> {
    let store = open_store(cache, OpenAs::OwnerIfFree)?;
    if let Some(digest) = forget {
        let forgotten = store.forget_attempts(digest);
        if forgotten == 0 {
            anyhow::bail!("--forget {digest}: no refused image with this digest (see `ls`)");
        }
        println!("{digest}: forgotten; it is warmed again when next asked for");
        return Ok(());
    }
    let mut entries = store.entries();
    entries.sort_by_key(|e| std::cmp::Reverse(e.meta.last_used));
    if json {
        let rows: Vec<_> = entries.iter().map(|e| &e.meta).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", ls_table(&store, &entries));
    }
    Ok(())
}

/// `ls` for people: sizes in binary units, newest use first.
fn ls_table(store: &CacheStore, entries: &[CacheEntry]) -> String {
    use vmdisk_crds::format_bytes_human as human;
    let mut out = format!(
        "{:<73} {:<6} {:>10} {:>10} {:<20} PINNED\n",
        "DIGEST", "FORMAT", "VIRTUAL", "ALLOCATED", "LAST USED"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<73} {:<6} {:>10} {:>10} {:<20} {}\n",
            e.key.digest,
            e.key.format,
            human(e.meta.virtual_size),
            human(e.meta.allocated_size),
            e.meta.last_used.format("%Y-%m-%d %H:%M:%S"),
            if store.is_pinned(&e.key) { "yes" } else { "no" }
        ));
    }
    out.push_str(&format!(
        "{} entries, {} used of a {} budget\n",
        entries.len(),
        human(store.used_bytes()),
        human(store.budget_bytes())
    ));
    for p in store.poisoned() {
        out.push_str(&format!(
            "refused: {} {} ({}): {} warms died with their process; `ls --forget {}` to retry\n",
            p.key.digest, p.key.format, p.reference, p.unfinished, p.key.digest
        ));
    }
    out
}
