//! The synthetic world written in MagicBrush's layout reads back as generated, and the evaluator
//! scores it as it should (a perfect editor, a do-nothing editor).

use std::collections::HashMap;

use image::RgbImage;
use rl4pix_training::data::{Dataset, Session};
use rl4pix_training::eval::{Evaluator, GeneratedImages, Result, Setting};
use rl4pix_training::synth::{write_folder, SynthWorld};

#[test]
fn written_folder_reads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let world = SynthWorld::new(32, 99);
    let summary = write_folder(&world, dir.path(), 40, 2, &|| {}).unwrap();
    assert_eq!(summary.sessions, 40);
    let dataset = Dataset::open(dir.path(), None).unwrap();
    assert_eq!(dataset.turn_count() as u64, summary.turns);
    for (index, read) in dataset.sessions().enumerate() {
        let read = read.unwrap();
        let made = world.session(index as u64);
        assert_eq!(read.id, made.id);
        assert_eq!(read.turns.len(), made.turns.len());
        for (a, b) in read.turns.iter().zip(&made.turns) {
            assert_eq!(a.instruction, b.instruction);
            assert_eq!(a.source, b.source);
            assert_eq!(a.target, b.target);
            assert_eq!(a.mask, b.mask);
            assert_eq!(a.local_description, b.local_description);
            assert_eq!(a.edit_kind, b.edit_kind);
        }
    }
    let global = std::fs::read_to_string(dir.path().join("global_descriptions.json")).unwrap();
    assert!(global.contains("\"000000-input.png\""));
}

#[test]
fn same_seed_same_bytes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let world = SynthWorld::new(32, 5);
    write_folder(&world, a.path(), 10, 1, &|| {}).unwrap();
    write_folder(&world, b.path(), 10, 3, &|| {}).unwrap();
    for file in [
        "edit_sessions.json",
        "local_descriptions.json",
        "images/000007/000007-output1.png",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(file)).unwrap(),
            std::fs::read(b.path().join(file)).unwrap(),
            "{file}"
        );
    }
}

/// Edits by looking up the answer (or by changing nothing); checks iterative turns come in order.
struct Oracle {
    perfect: bool,
    requests: Vec<(String, usize, Setting)>,
}

impl GeneratedImages for Oracle {
    fn generated(
        &mut self,
        session: &Session,
        turn_index: usize,
        setting: Setting,
    ) -> Result<RgbImage> {
        self.requests
            .push((session.id.clone(), turn_index, setting));
        let turn = &session.turns[turn_index - 1];
        Ok(if self.perfect {
            turn.target.clone()
        } else {
            turn.source.clone()
        })
    }
}

#[test]
fn evaluator_scores_perfect_and_idle_editors() {
    let world = SynthWorld::new(32, 3);
    let sessions: Vec<Session> = (0..30).map(|i| world.session(i)).collect();
    let turns: usize = sessions.iter().map(|s| s.turns.len()).sum();

    let mut perfect = Oracle {
        perfect: true,
        requests: Vec::new(),
    };
    let mut evaluator = Evaluator::new(None);
    for s in &sessions {
        evaluator.add_session(s, &mut perfect).unwrap();
    }
    let report = evaluator.report();
    assert_eq!(report.all_turn.count, turns);
    assert_eq!(report.final_turn.count, sessions.len());
    assert_eq!(report.all_turn.l1, Some(0.0));
    assert_eq!(report.all_turn.ssim, Some(1.0));
    assert_eq!(report.all_turn.edit_l1, Some(0.0));
    assert_eq!(
        report.all_turn.preserve_l1,
        Some(0.0),
        "the synth mask covers every change"
    );

    // Iterative turns are requested in order, after the independent ones.
    let mut per_session: HashMap<String, Vec<(usize, Setting)>> = HashMap::new();
    for (id, k, setting) in perfect.requests {
        per_session.entry(id).or_default().push((k, setting));
    }
    for s in &sessions {
        let n = s.turns.len();
        let mut want: Vec<(usize, Setting)> = (1..=n).map(|k| (k, Setting::Independent)).collect();
        if n == 1 {
            want.push((1, Setting::Iterative));
        } else {
            want.extend((2..=n).map(|k| (k, Setting::Iterative)));
        }
        assert_eq!(per_session[&s.id], want, "session {}", s.id);
    }

    let mut idle = Oracle {
        perfect: false,
        requests: Vec::new(),
    };
    let mut evaluator = Evaluator::new(None);
    for s in &sessions {
        evaluator.add_session(s, &mut idle).unwrap();
    }
    let report = evaluator.report();
    assert_eq!(report.all_turn.preserve_l1, Some(0.0));
    assert!(report.all_turn.edit_l1.unwrap() > 0.05);
    assert!(report.all_turn.l1.unwrap() > 0.0);
}

#[test]
fn a_local_description_is_true_of_its_target_and_not_of_its_source() {
    use rand::SeedableRng;
    use rl4pix_training::synth::describes;
    let world = SynthWorld::new(32, 77);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
    let mut removals = 0;
    for _ in 0..300 {
        let sample = world.random_turn(&mut rng);
        let text = sample.turn.local_description.clone().unwrap();
        assert!(
            describes(&sample.after, &text),
            "{text:?} should describe its target"
        );
        // Every edit changes the described cell, so its description was false of the source.
        assert!(
            !describes(&sample.before, &text),
            "{text:?} should not describe the source"
        );
        assert!(!describes(&sample.after, "a small grey circle nowhere"));
        removals += usize::from(text.starts_with("empty background"));
    }
    assert!(removals > 30, "{removals}");
}
