//! MagicBrush readers on the folder and parquet fixtures of `tests/make_metrics_fixtures.py`, and the
//! errors bad input must give (each naming the file or column at fault).

use std::path::{Path, PathBuf};

use rl4pix_training::data::{Dataset, Session};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn read_all(dataset: &Dataset) -> Vec<Session> {
    dataset.sessions().map(|s| s.unwrap()).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn mask_area(session: &Session, turn: usize) -> f32 {
    session.turns[turn].mask.pixels().map(|p| p.0[0]).sum()
}

#[test]
fn folder_layout_is_read_with_all_mask_encodings() {
    let dataset = Dataset::open(&fixtures().join("magicbrush"), None).unwrap();
    assert!(matches!(dataset, Dataset::Folder(_)));
    assert_eq!(dataset.turn_count(), 3);
    assert_eq!(dataset.session_count(), Some(2));
    let sessions = read_all(&dataset);
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["101", "202"]);
    let s = &sessions[1];
    assert_eq!(s.turns.len(), 2);
    assert_eq!(s.turns[1].turn_index, 2);
    assert_eq!(s.turns[1].instruction, "make the bottom green");
    assert_eq!(
        s.turns[1].local_description.as_deref(),
        Some("a green stripe at the bottom")
    );
    assert_eq!(
        s.turns[0].target, s.turns[1].source,
        "turn 2 starts from turn 1's output"
    );
    // The rectangles drawn by the fixture script, as greyscale, RGB and RGBA masks.
    assert_eq!(mask_area(&sessions[0], 0), 7.0 * 7.0);
    assert_eq!(mask_area(s, 0), 8.0 * 6.0);
    assert_eq!(mask_area(s, 1), 18.0 * 7.0);
    assert!(s
        .turns
        .iter()
        .all(|t| t.mask.pixels().all(|p| p.0[0] == 0.0 || p.0[0] == 1.0)));
}

#[test]
fn parquet_shards_match_the_folder_and_respect_the_split() {
    let folder = read_all(&Dataset::open(&fixtures().join("magicbrush"), None).unwrap());
    let parquet_dir = fixtures().join("magicbrush_parquet");
    let test = Dataset::open(&parquet_dir, Some("test")).unwrap();
    assert!(matches!(test, Dataset::Parquet(_)));
    assert_eq!(test.turn_count(), 3);
    let test = read_all(&test);
    assert_eq!(test.len(), folder.len());
    for (a, b) in test.iter().zip(&folder) {
        assert_eq!(a.id, b.id);
        assert_eq!(a.turns.len(), b.turns.len());
        for (x, y) in a.turns.iter().zip(&b.turns) {
            assert_eq!(
                (x.turn_index, &x.instruction),
                (y.turn_index, &y.instruction)
            );
            assert_eq!(x.source, y.source);
            assert_eq!(x.target, y.target);
            assert_eq!(x.mask, y.mask);
            // The hub's parquet has no local descriptions.
            assert_eq!(x.local_description, None);
        }
    }
    let train = read_all(&Dataset::open(&parquet_dir, Some("train")).unwrap());
    assert_eq!(
        train.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["909"]
    );
    assert_eq!(
        read_all(&Dataset::open(&parquet_dir, None).unwrap()).len(),
        3
    );
    // One file given directly is read whatever its name.
    let one = parquet_dir.join("data/train-00000-of-00001.parquet");
    assert_eq!(
        read_all(&Dataset::open(&one, Some("test")).unwrap()).len(),
        1
    );
    let err = Dataset::open(&parquet_dir, Some("dev"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("split `dev`") && err.contains("test-00000-of-00001.parquet"),
        "{err}"
    );
}

#[test]
fn missing_data_set_is_named() {
    let path = fixtures().join("no-such-dataset");
    let err = Dataset::open(&path, None).err().unwrap().to_string();
    assert!(
        err.contains("no-such-dataset") && err.contains("not found"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = Dataset::open(empty.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("edit_sessions.json") && err.contains(".parquet"),
        "{err}"
    );
}

#[test]
fn session_json_naming_a_missing_file_is_reported_on_open() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("magicbrush"), dir.path());
    std::fs::remove_file(dir.path().join("images/202/202-mask2.png")).unwrap();
    let err = Dataset::open(dir.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("edit_sessions.json")
            && err.contains("session 202 turn 2")
            && err.contains("202-mask2.png"),
        "{err}"
    );
}

#[test]
fn corrupt_png_and_bad_json_are_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("magicbrush"), dir.path());
    let bad = dir.path().join("images/101/101-output1.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n not really a png").unwrap();
    let dataset = Dataset::open(dir.path(), None).unwrap();
    let err = dataset
        .sessions()
        .next()
        .unwrap()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("101-output1.png") && err.contains("cannot decode"),
        "{err}"
    );

    std::fs::write(dir.path().join("edit_sessions.json"), "{\"101\": [").unwrap();
    let err = Dataset::open(dir.path(), None).err().unwrap().to_string();
    assert!(
        err.contains("edit_sessions.json") && err.contains("invalid JSON"),
        "{err}"
    );
}

#[test]
fn parquet_without_a_needed_column_or_corrupt_is_named() {
    let path = fixtures().join("magicbrush_bad/no_instruction.parquet");
    let err = Dataset::open(&path, None).err().unwrap().to_string();
    assert!(
        err.contains("no_instruction.parquet") && err.contains("`instruction`"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("test-0.parquet");
    std::fs::write(&corrupt, b"PAR1 definitely not parquet").unwrap();
    let err = Dataset::open(dir.path(), Some("test"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("test-0.parquet"), "{err}");
}
