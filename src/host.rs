//! The host handle: every side effect decision code may cause on the machine — NAT,
//! runc queries, processes, cgroups, time — behind one small bundle of traits, passed
//! down from the executables. `Host::system` is the real machine; unit tests build one
//! from the in-memory fakes beside each trait, so decisions run without root.

use std::path::Path;

use crate::nat::{self, Nat};
use crate::runc::query::{RuncBinary, RuncQuery};
use crate::sys::cgroup::{CgroupFs, Cgroups};
use crate::sys::clock::{Clock, SystemClock};
use crate::sys::process::{Processes, Procfs};

pub struct Host {
    pub nat: Box<dyn nat::Backend>,
    pub runc: Box<dyn RuncQuery>,
    pub procs: Box<dyn Processes>,
    pub cgroups: Box<dyn Cgroups>,
    pub clock: Box<dyn Clock>,
}

impl Host {
    /// The real machine: nf_tables and ctnetlink (nft for setup), the configured runc, `/proc`, `/sys/fs/cgroup`.
    pub fn system(runc: &Path) -> Host {
        Host {
            nat: Box::new(Nat::default()),
            runc: Box::new(RuncBinary { path: runc.into() }),
            procs: Box::new(Procfs),
            cgroups: Box::new(CgroupFs::default()),
            clock: Box::new(SystemClock),
        }
    }
}

#[cfg(test)]
pub mod fake {
    //! A host made of fakes, with typed access to each for assertions.

    use std::rc::Rc;

    use super::Host;
    use crate::nat::{self, FakeNat, Mapping};
    use crate::runc::query::{FakeRunc, RuncQuery};
    use crate::sys::cgroup::{Cgroups, FakeCgroups, SidecarCgroup};
    use crate::sys::clock::{Clock, FakeClock};
    use crate::sys::process::{FakeProcesses, ProcId, Processes};

    #[derive(Default)]
    pub struct Fakes {
        pub nat: Rc<FakeNat>,
        pub runc: Rc<FakeRunc>,
        pub procs: Rc<FakeProcesses>,
        pub cgroups: Rc<FakeCgroups>,
        pub clock: Rc<FakeClock>,
    }

    impl Fakes {
        pub fn host(&self) -> Host {
            Host {
                nat: Box::new(Shared(self.nat.clone())),
                runc: Box::new(Shared(self.runc.clone())),
                procs: Box::new(Shared(self.procs.clone())),
                cgroups: Box::new(Shared(self.cgroups.clone())),
                clock: Box::new(Shared(self.clock.clone())),
            }
        }
    }

    /// Lets the host own a handle while the test keeps one to inspect.
    struct Shared<T>(Rc<T>);

    impl<T: nat::Backend> nat::Backend for Shared<T> {
        fn add(&self, m: &[Mapping]) -> crate::Result<()> {
            self.0.add(m)
        }
        fn remove(&self, m: &[Mapping]) -> crate::Result<()> {
            self.0.remove(m)
        }
        fn list(&self) -> crate::Result<Vec<Mapping>> {
            self.0.list()
        }
    }
    impl<T: RuncQuery> RuncQuery for Shared<T> {
        fn knows(&self, root: &std::path::Path, id: &str) -> bool {
            self.0.knows(root, id)
        }
        fn list(&self, root: &std::path::Path) -> Option<std::collections::BTreeSet<String>> {
            self.0.list(root)
        }
    }
    impl<T: Processes> Processes for Shared<T> {
        fn alive(&self, p: &ProcId) -> bool {
            self.0.alive(p)
        }
        fn exists(&self, pid: i32) -> bool {
            self.0.exists(pid)
        }
        fn terminate(&self, p: &ProcId, g: std::time::Duration) -> bool {
            self.0.terminate(p, g)
        }
        fn scan(&self) -> Vec<(ProcId, Vec<String>)> {
            self.0.scan()
        }
        fn spawn_detached(
            &self,
            program: &std::path::Path,
            args: &[String],
            log: &std::path::Path,
        ) -> std::io::Result<()> {
            self.0.spawn_detached(program, args, log)
        }
    }
    impl<T: Cgroups> Cgroups for Shared<T> {
        fn envoy_children(&self) -> Vec<crate::sys::cgroup::Found> {
            self.0.envoy_children()
        }
        fn container_busy(&self, cg: &SidecarCgroup) -> bool {
            self.0.container_busy(cg)
        }
        fn kill_and_remove(&self, cg: &SidecarCgroup) -> crate::Result<()> {
            self.0.kill_and_remove(cg)
        }
    }
    impl<T: Clock> Clock for Shared<T> {
        fn now(&self) -> std::time::Instant {
            self.0.now()
        }
        fn wall(&self) -> std::time::SystemTime {
            self.0.wall()
        }
    }
}
