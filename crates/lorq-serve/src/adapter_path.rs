//! Turning a client-supplied adapter id into a folder under one of the `--adapter-dir` roots,
//! refusing anything that could leave them.

use std::path::{Component, Path, PathBuf};

use crate::error::ApiError;

/// Resolves `id` (like `org/name`) to `root/id` for the first root that has it.
///
/// Refused: empty ids, absolute paths, `..`/`.` components, backslashes, NUL, and any id whose
/// canonical path (symlinks followed) is outside its root.
pub fn resolve(roots: &[PathBuf], id: &str) -> Result<PathBuf, ApiError> {
    check_syntax(id)?;
    if roots.is_empty() {
        return Err(ApiError::not_found(format!(
            "adapter {id:?} not found: the server was started without --adapter-dir"
        )));
    }
    for root in roots {
        let candidate = root.join(id);
        let Ok(canonical) = candidate.canonicalize() else {
            continue;
        };
        let root_canonical = root.canonicalize().map_err(|e| {
            ApiError::generation(format!(
                "adapter root {} cannot be read: {e}",
                root.display()
            ))
        })?;
        if !canonical.starts_with(&root_canonical) {
            return Err(ApiError::validation(format!(
                "adapter id {id:?} resolves outside the adapter directory (a symlink leaves it); refused"
            )));
        }
        if canonical.is_dir() {
            return Ok(canonical);
        }
    }
    Err(ApiError::not_found(format!(
        "adapter {id:?} not found in the adapter directories"
    )))
}

fn check_syntax(id: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::validation(format!(
            "adapter id {id:?} is not allowed: {why}"
        )))
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > 512 {
        return bad("it is longer than 512 bytes");
    }
    if id.contains('\0') || id.contains('\\') {
        return bad("it contains a NUL or a backslash");
    }
    if id.starts_with('/') || Path::new(id).is_absolute() {
        return bad("absolute paths are refused; give a folder name under --adapter-dir");
    }
    for c in Path::new(id).components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return bad("`..` (path traversal) is refused"),
            _ => return bad("only plain folder names separated by `/` are allowed"),
        }
    }
    if id.split('/').any(|p| p.is_empty() || p == ".") {
        return bad("empty or `.` path components are refused");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_traversal_absolute_and_escaping_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("org/name")).unwrap();
        let roots = vec![root.path().to_path_buf()];
        assert!(resolve(&roots, "org/name").is_ok());
        for id in [
            "../x",
            "org/../../x",
            "/etc",
            "",
            "org//name",
            "./org",
            "a\\b",
        ] {
            let e = resolve(&roots, id).unwrap_err();
            assert_eq!(e.status.as_u16(), 422, "{id}: {}", e.message);
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outside.path(), root.path().join("leak")).unwrap();
            let e = resolve(&roots, "leak").unwrap_err();
            assert!(e.message.contains("outside"), "{}", e.message);
        }
        let e = resolve(&roots, "org/missing").unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
    }
}
