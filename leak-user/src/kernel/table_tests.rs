//! The attach tables' own invariants.

use super::*;

const CHAINS: [Chain; 2] = [OOM_HOOK_CHAIN, CHARGE_PATH_CHAIN];

fn probes(chain: &Chain) -> impl Iterator<Item = &'static Probe> + '_ {
    chain
        .rows
        .iter()
        .flat_map(|row| row.steps.iter())
        .flat_map(|step| step.choices.iter())
}

#[test]
fn every_chain_tries_the_modes_in_the_readme_order() {
    let order = [
        AttachMode::Fentry,
        AttachMode::Kprobe,
        AttachMode::TpBtf,
        AttachMode::Tracepoint,
    ];
    for chain in CHAINS {
        let modes: Vec<_> = chain.rows.iter().map(|row| row.mode).collect();
        assert_eq!(modes, order, "{}", chain.name);
    }
}

#[test]
fn every_program_is_in_a_table_and_names_are_unique() {
    for program in Program::ALL {
        assert!(
            CHAINS
                .iter()
                .any(|chain| probes(chain).any(|probe| probe.programs.contains(&program))),
            "{program} is in no table"
        );
    }
    let mut names: Vec<_> = Program::ALL.iter().map(|p| p.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Program::ALL.len());
}

#[test]
fn every_program_is_in_the_bpf_object() {
    // The object's string table holds each program's symbol, NUL-terminated.
    for program in Program::ALL {
        let symbol = [program.name().as_bytes(), b"\0"].concat();
        assert!(
            super::super::EBPF_OBJECT
                .windows(symbol.len())
                .any(|window| window == symbol),
            "{program} is not in the BPF object"
        );
    }
}

#[test]
fn a_probe_is_one_family_and_a_tracepoint_has_a_category() {
    for chain in CHAINS {
        for row in chain.rows {
            assert!(row.steps.iter().all(|step| !step.choices.is_empty()));
        }
        for probe in probes(&chain) {
            assert!(!probe.programs.is_empty());
            for program in probe.programs {
                assert_eq!(program.kind().need(), probe.need(), "{program}");
            }
            if probe.need() == Need::TracefsFormat {
                assert!(probe.hook.category().is_some(), "{}", probe.hook);
            }
        }
    }
}

#[test]
fn a_row_attaches_its_required_programs_in_its_own_mode() {
    for chain in CHAINS {
        for row in chain.rows {
            let first = row.steps.first().expect("a row has steps");
            assert_eq!(first.role, Role::Required);
            for probe in first.choices {
                for program in probe.programs {
                    assert_eq!(program.kind().mode(), row.mode, "{program}");
                }
            }
        }
    }
}
