//! Every reason the operator gives, in one enum: why an order waits, fails or drains, how a run
//! ended, what a condition or an Event says. Each carries its kind, its failure domain, its requeue
//! and its documented meaning; the CRDs still show the PascalCase word.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What a reason reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Normal progress: a phase reached, a step under way.
    Progress,
    /// A gate blocks; the object waits for a change of spec, settings, approval or live state.
    Wait,
    /// A gate refuses for good: the order ends FAILED.
    Fatal,
    /// Why a run is drained (results collected, then the pod ends).
    Drain,
    /// How a finished run ended.
    Outcome,
    /// Something the operator did or found that people should see (an Event).
    Notice,
}

/// The pipeline's failure domains: who must act when a reason of this domain blocks or fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// The order is invalid or cannot be served as written (policy, GPU, provider, capacity).
    Order,
    /// The study (the experiment's code, payload, results contract) is invalid or failed.
    Study,
    /// The worker claim: binding, runnable work, heartbeats of the claimed run.
    Claim,
    /// Paid-resource authority: approval, budgets, balance, spend and lifetime limits.
    Paid,
    /// Two owners for one run: duplicate pods, stale fencing tokens, divergent terminal state.
    SplitBrain,
    /// Work that went around the operator: pods made by hand, stale registry rows.
    Bypass,
}

impl Domain {
    pub const ALL: [Domain; 6] = [Self::Order, Self::Study, Self::Claim, Self::Paid, Self::SplitBrain, Self::Bypass];

    /// The failure domain of a reconcile error's category (`Error::category`), which says who
    /// acts on it: RunPod and the provider are the order's (its account, GPU or capacity), the
    /// volume and payload sync the study's, and the Kubernetes API and the process itself the
    /// platform's claim on the work.
    pub fn of_error_category(category: &str) -> Self {
        match category {
            "runpod_rate_limited" | "runpod_unauthorized" | "runpod" | "provider" => Self::Order,
            "s3" | "sync" => Self::Study,
            _ => Self::Claim,
        }
    }

    /// The label value (`domain="paid"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Study => "study",
            Self::Claim => "claim",
            Self::Paid => "paid",
            Self::SplitBrain => "split-brain",
            Self::Bypass => "bypass",
        }
    }
}

/// When a blocked object looks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// At once (the next step can run now).
    Now,
    /// Within seconds: a pod starting or draining.
    Fast,
    /// At the poll interval: live state (stock, budget, provider) may change by itself.
    Poll,
    /// A person must change something; the watch wakes the object, a slow timer is a backstop.
    Person,
    /// RunPod has no machine: not before 30 s.
    Capacity,
    /// The account needs money: every two minutes.
    Balance,
    /// Nothing more happens to the object.
    Never,
}

impl Requeue {
    /// The wait, given the poll interval in force; None for [`Requeue::Never`].
    pub fn after(self, poll: Duration) -> Option<Duration> {
        match self {
            Self::Now => Some(Duration::ZERO),
            Self::Fast => Some(FAST),
            Self::Poll => Some(poll),
            Self::Person => Some(Duration::from_secs(60)),
            Self::Capacity => Some(poll.max(Duration::from_secs(30))),
            Self::Balance => Some(Duration::from_secs(120)),
            Self::Never => None,
        }
    }
}

impl Requeue {
    /// For the docs table.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Now => "at once",
            Self::Fast => "every 2 s",
            Self::Poll => "every poll interval",
            Self::Person => "on a change (60 s backstop)",
            Self::Capacity => "after 30 s (or the poll interval)",
            Self::Balance => "every 2 min",
            Self::Never => "never",
        }
    }
}

/// How often a starting or draining pod is looked at.
pub const FAST: Duration = Duration::from_secs(2);

macro_rules! reasons {
    ($($name:ident: $kind:ident, $domain:ident, $requeue:ident, $meaning:literal;)*) => {
        /// A reason, as conditions, status fields, Events and the registry show it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason { $($name,)* }

        impl Reason {
            /// Every reason, in documentation order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The PascalCase word.
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$name => stringify!($name),)* }
            }
            pub fn kind(self) -> Kind {
                match self { $(Reason::$name => Kind::$kind,)* }
            }
            pub fn domain(self) -> Domain {
                match self { $(Reason::$name => Domain::$domain,)* }
            }
            /// When an object blocked for this reason looks again.
            pub fn requeue(self) -> Requeue {
                match self { $(Reason::$name => Requeue::$requeue,)* }
            }
            /// What the reason means and what to do about it (docs/operator.md prints these).
            pub fn meaning(self) -> &'static str {
                match self { $(Reason::$name => $meaning,)* }
            }
        }
    };
}

reasons! {
    // The order contract (REQUESTED).
    Accepted: Progress, Order, Now, "The order is durable in the Kubernetes API; nothing is paid for yet.";
    Requested: Progress, Order, Now, "The order is being checked against live RunPod state.";
    UnknownPolicy: Wait, Order, Person, "The policy named in the spec is not in the settings; the message lists the known policies and aliases.";
    PolicyViolation: Wait, Order, Person, "The order asks for what its policy does not allow (for example another cloud type).";
    SpotUnavailable: Fatal, Order, Never, "Interruptible (spot) pods were asked for; RunPod no longer offers them. Set gpu.interruptible to false.";
    AwaitingApproval: Wait, Paid, Person, "The policy needs approval before money is spent: an approver runs `kubectl ep approve`.";
    Approved: Progress, Paid, Now, "An approver approved an experiment's spending within an envelope: its orders inside it (retries included) need no further approval.";
    RerunRequested: Progress, Study, Now, "A finished experiment was asked to run again (`kubectl ep rerun`, spec.rerun): a new attempt follows.";
    Restarted: Progress, Study, Now, "The live attempt was stopped for a spec change under `onSpecChange: Restart`; the next attempt runs with the change and does not count as a retry.";
    SpecChangePending: Progress, Study, Now, "The Experiment was edited while an attempt runs: the live attempt keeps what it started with; the condition names the fields that apply from the next attempt.";
    BudgetExceeded: Wait, Paid, Poll, "The namespace's GPU or spend budget has no room; the message gives the figures.";
    OverPriceLimit: Wait, Paid, Poll, "Every GPU choice costs more per hour than the order or its policy allows.";
    InsufficientBalance: Wait, Paid, Balance, "RunPod refused the pod: the account's balance is too low. Add funds.";
    ProviderMissing: Wait, Order, Person, "spec.providerRef names no RunPodProvider.";
    ProviderNotReady: Wait, Order, Poll, "The provider is not Ready; its own condition says why.";
    SecretMissing: Wait, Order, Person, "A Secret (or a key in it) the provider or the experiment's env names does not exist.";
    InvalidEndpoint: Wait, Order, Person, "The provider's API endpoint is not a usable URL.";
    KubernetesUnavailable: Wait, Order, Poll, "The Kubernetes API did not answer a read the gate needs.";
    DataCenterMismatch: Wait, Order, Person, "The data center asked for is not the one the network volume lives in.";
    UnknownGpuType: Wait, Order, Person, "RunPod's live catalog lists none of the GPU choices; use an alias or a RunPod gpu type id.";
    NoStock: Wait, Order, Poll, "No GPU choice has stock in the data center now.";
    Provisioned: Progress, Order, Now, "GPU choices resolved and checked against the live catalog; policy, data center, approval and budget agree.";
    // The payload (PROVISIONED).
    PayloadMissing: Wait, Study, Person, "The payload is not on the volume (push it with `kubectl ep push DIR`) or its ConfigMap is missing.";
    InvalidPayload: Wait, Study, Person, "The payload cannot be built: a declared location is missing or a path leaves the payload root.";
    VolumeFull: Wait, Study, Poll, "The network volume is full (HTTP 507); free space or grow the volume.";
    S3Unavailable: Wait, Study, Poll, "The volume's S3 API failed (5xx or no answer); the sync is retried.";
    RunnerUploaded: Notice, Order, Now, "The ep-runner binary was uploaded to the volume.";
    Synced: Progress, Study, Now, "The payload and the runner binary are on the volume, every file verified by head_object.";
    // The claim (SYNCED).
    NothingRunnable: Wait, Claim, Person, "The order is bound to no runnable attempt (its experiment is missing or has none waiting).";
    NotBound: Wait, Claim, Person, "The order is not bound to its experiment's current attempt.";
    BindingRepaired: Notice, Claim, Now, "An order made by hand was bound to an attempt that is no longer current (a stale binding); it was re-bound to the attempt being claimed, and the registry records the repair in attempts.reconcile_action.";
    WorkerBusy: Wait, Claim, Poll, "spec.workerAffinity.exclusive: every allowed worker holds a live order; the attempt starts when one is free.";
    WorkerMismatch: Wait, Claim, Person, "The order's worker is not among the experiment's allowed workers, or the runtime target is not runpod.";
    LeaseHeld: Wait, SplitBrain, Poll, "Another attempt of the experiment has not ended and its runner's lease (last heartbeat + heartbeatTimeout) has not passed; this attempt is claimed after.";
    RunIdCollision: Fatal, SplitBrain, Never, "The run's spec.json on the volume belongs to another claim; it is never overwritten.";
    Claimed: Progress, Claim, Now, "The attempt is claimed (run id, fencing token) and its spec.json written.";
    // The paid pod (VERIFIED, RUNNER_ONLINE).
    Launching: Progress, Paid, Now, "Creating the pod.";
    NoCapacity: Wait, Order, Capacity, "RunPod had no machine for any GPU choice; the order tries again from the first choice.";
    TryingNextGpu: Notice, Order, Now, "RunPod had no machine for one GPU choice; the next choice is tried.";
    CreateRejected: Fatal, Order, Never, "RunPod refused the pod for a reason retrying cannot fix; the message quotes RunPod.";
    CreateOutcomeUnknown: Wait, Paid, Fast, "A create was not answered in time, or failed after it may have reached RunPod; the pod is looked for by name before any other create.";
    CreateLost: Notice, Paid, Now, "A create whose answer was lost never showed in RunPod's pod list; the pod is created again.";
    PodAdopted: Notice, Paid, Now, "A pod of this run already existed (a create whose answer was lost); it was adopted, not duplicated.";
    PodBound: Notice, Paid, Now, "The pod serving the run was recorded.";
    DuplicateRunnerStopped: Notice, SplitBrain, Now, "Two runners heartbeat for one run with the same claim (a duplicate pod, a runner started by hand): the one that started first keeps it and owner.json stops the other.";
    DuplicatePodTerminated: Notice, SplitBrain, Now, "A second pod for one run was found and terminated.";
    WaitingForRuntime: Progress, Paid, Fast, "The pod exists; RunPod has not started its container yet.";
    WaitingForHeartbeat: Progress, Paid, Fast, "The container runs; the runner's first heartbeat has not arrived.";
    RunnerOnline: Progress, Paid, Poll, "The runner heartbeats in the pod.";
    // Why a run drains (DRAINING).
    Draining: Progress, Paid, Fast, "Collecting and verifying the run's results before the pod is ended.";
    RunFinished: Drain, Study, Now, "The runner wrote terminal.json.";
    StopRequested: Drain, Paid, Now, "spec.stop asks the order to drain.";
    OrderDeleted: Drain, Paid, Now, "The order (or its experiment) was deleted; it drains before it goes.";
    HeartbeatLost: Drain, Claim, Now, "The pod is listed but the runner's heartbeat is older than heartbeatTimeout.";
    PodVanished: Drain, Paid, Now, "RunPod no longer lists a pod whose runner was online (host lost, or ended outside the operator).";
    PodGone: Drain, Paid, Now, "RunPod no longer lists a pod that never came online.";
    PodExited: Drain, Paid, Now, "RunPod reports the pod EXITED (stopped outside the operator).";
    RuntimeNeverAppeared: Drain, Paid, Now, "The pod's container never started within runtimeStartDeadline.";
    LifetimeReached: Drain, Paid, Now, "The pod reached its maximum lifetime or the experiment's maxRuntime.";
    CostLimitReached: Drain, Paid, Now, "The run reached the experiment's limits.maxCostUsd.";
    FencingTokenMismatch: Drain, SplitBrain, Now, "A heartbeat carries another claim's fencing token: two runners for one run.";
    // How a run ended (DELETED).
    NonZeroExit: Outcome, Study, Never, "The training command exited with a non-zero code; the message has the last lines of stderr.";
    TimedOut: Outcome, Study, Never, "The runner stopped the command at the experiment's maxRuntime.";
    PayloadVerificationFailed: Outcome, Study, Never, "The runner refused the payload: a file on the volume differs from the manifest.";
    ResultsContractBroken: Outcome, Study, Never, "The results file is missing, does not parse, or lacks a declared metric.";
    TerminalDivergence: Outcome, SplitBrain, Never, "terminal.json or its artifacts disagree with each other or with the claim.";
    StoppedBeforeLaunch: Outcome, Paid, Never, "A stop or a deletion ended the order before any pod was created.";
    PodTerminated: Progress, Paid, Never, "The pod is terminated and RunPod no longer lists it.";
    Succeeded: Progress, Study, Never, "The run succeeded and its results are verified.";
    RunFailed: Outcome, Study, Never, "The run ended without a verified success; the outcome says why.";
    // The experiment.
    OrderCreated: Progress, Claim, Poll, "The attempt's order was created.";
    AttemptClaimed: Progress, Claim, Now, "An attempt was claimed: run id and fencing token are in status before its order exists.";
    Running: Progress, Claim, Never, "The attempt's runner is online.";
    RetentionMissing: Wait, Study, Person, "spec.checkpoints.retention is required before any launch: Keep, KeepLast or Discard.";
    Suspended: Wait, Study, Never, "spec.suspend is true: no new attempt starts.";
    DependencyPending: Wait, Study, Poll, "An experiment named in spec.dependsOn has not succeeded yet.";
    DependencyFailed: Wait, Study, Poll, "An experiment named in spec.dependsOn failed.";
    AttemptFailed: Notice, Study, Now, "An attempt failed and attempts remain: the next starts after the backoff.";
    RetriesExhausted: Outcome, Study, Never, "The last allowed attempt failed.";
    NotRetried: Outcome, Study, Never, "An attempt failed in a way `retry.when` does not retry (by default only a lost pod is retried, not a script error).";
    StatusDivergence: Outcome, SplitBrain, Never, "The run's terminal state could not be trusted (see TerminalDivergence).";
    Stopped: Outcome, Paid, Never, "The attempt was stopped on request.";
    ExperimentDeleted: Notice, Study, Never, "The experiment was deleted; the registry records it as ended.";
    Done: Progress, Study, Never, "Nothing more will happen to the object.";
    Progressing: Progress, Study, Never, "The object is not stalled.";
    // The provider.
    Ready: Progress, Order, Poll, "The account answers, the volume exists in its data center and its S3 API answers.";
    BadApiKey: Wait, Order, Person, "RunPod refused the API key in the provider's Secret.";
    VolumeMissing: Wait, Order, Person, "The network volume is not one of the account's; the message lists those that exist.";
    S3Unauthorized: Wait, Order, Person, "The volume's S3 API refused the credentials in the provider's Secret.";
    S3Unreachable: Wait, Order, Poll, "The volume's S3 API did not answer.";
    RunPodUnavailable: Wait, Order, Poll, "RunPod's API did not answer or failed (5xx); the call is made again at the next poll.";
    RunPodRateLimited: Wait, Order, Poll, "RunPod answered 429 (rate limited); the call waits for its Retry-After.";
    GraphqlRetiring: Notice, Order, Never, "The provider speaks RunPod's GraphQL API, which RunPod retires in early 2027: set spec.api.transport to restV2.";
    OrphanPod: Notice, Bypass, Never, "The account holds a pod no order owns (made by hand, or left by deletionPolicy Orphan).";
    // The operator itself.
    Mirrored: Progress, Claim, Never, "The registry holds this object's rows.";
    RegistryUnavailable: Wait, Claim, Poll, "PostgreSQL does not answer; registry writes wait and catch up when it returns.";
    RegistrySchemaRefused: Wait, Claim, Poll, "The database holds an exp_registry the operator cannot adopt without converting data; the message names each column and the fix. Nothing is written to it until then.";
    RegistryDivergence: Notice, SplitBrain, Never, "The registry's row for the experiment disagrees with the cluster (a final state on one side only, or no row); it is reported, never overwritten: correct the row or find what wrote it.";
    RowRefused: Notice, Bypass, Never, "PostgreSQL refused one of this object's registry rows; it is quarantined and the others are written.";
    SettingsRejected: Notice, Order, Never, "A settings edit was refused; the last good settings stay in force.";
    ReconcileError: Notice, Order, Never, "A reconcile failed and is retried with backoff; the message names the call that failed.";
    Undecodable: Notice, Bypass, Never, "The object does not match the operator's types and is skipped; fix or delete it.";
}

impl Reason {
    /// Whether a gate with this reason ends the order.
    pub fn is_fatal(self) -> bool {
        self.kind() == Kind::Fatal
    }

    /// Whether an Event for this reason should be a Warning (something a person should look at).
    pub fn is_warning(self) -> bool {
        match self.kind() {
            Kind::Progress => false,
            Kind::Wait | Kind::Fatal | Kind::Outcome => !matches!(self, Self::StoppedBeforeLaunch | Self::Stopped),
            Kind::Drain => !matches!(self, Self::RunFinished | Self::StopRequested | Self::OrderDeleted),
            Kind::Notice => matches!(
                self,
                Self::DuplicatePodTerminated
                    | Self::DuplicateRunnerStopped
                    | Self::GraphqlRetiring
                    | Self::CreateLost
                    | Self::OrphanPod
                    | Self::RowRefused
                    | Self::RegistryDivergence
                    | Self::SettingsRejected
                    | Self::ReconcileError
                    | Self::Undecodable
                    | Self::AttemptFailed
            ),
        }
    }

    /// The docs table of every reason (docs/operator.md holds it between markers; a test keeps it in sync).
    pub fn markdown_table() -> String {
        let mut out =
            String::from("| reason | kind | domain | looks again | meaning |\n| --- | --- | --- | --- | --- |\n");
        for r in Self::ALL {
            out.push_str(&format!(
                "| `{}` | {:?} | {} | {} | {} |\n",
                r.as_str(),
                r.kind(),
                r.domain().as_str(),
                r.requeue().describe(),
                r.meaning()
            ));
        }
        out
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not one of the operator's reasons.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a reason the operator knows")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s).ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

/// A gate that blocks: the reason and the message naming the field and the fix.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub reason: Reason,
    pub message: String,
}

impl Blocked {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_reason_parses_back_and_has_a_meaning() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>().unwrap(), *r);
            assert!(r.meaning().ends_with('.'), "{r}: {}", r.meaning());
            assert!(r.as_str().chars().next().unwrap().is_ascii_uppercase(), "{r} is PascalCase");
        }
        assert!("NoSuchReason".parse::<Reason>().is_err());
    }

    #[test]
    fn waits_requeue_and_fatal_reasons_never_do() {
        let poll = Duration::from_secs(10);
        for r in Reason::ALL.iter().filter(|r| r.kind() == Kind::Wait) {
            assert!(r.requeue().after(poll).is_some() || *r == Reason::Suspended, "{r} waits forever");
        }
        for r in Reason::ALL.iter().filter(|r| r.is_fatal()) {
            assert_eq!(r.requeue(), Requeue::Never, "{r}");
        }
        assert_eq!(Reason::NoCapacity.requeue().after(poll), Some(Duration::from_secs(30)));
        assert_eq!(Reason::AwaitingApproval.requeue().after(poll), Some(Duration::from_secs(60)));
        assert_eq!(Reason::BudgetExceeded.requeue().after(poll), Some(poll));
    }

    #[test]
    fn every_domain_has_reasons_that_block_or_fail() {
        for d in Domain::ALL {
            assert!(
                Reason::ALL.iter().any(|r| r.domain() == d && r.kind() != Kind::Progress),
                "domain {} has no blocking or failing reason",
                d.as_str()
            );
        }
    }

    #[test]
    fn routine_steps_are_not_warnings() {
        for r in [Reason::Provisioned, Reason::Launching, Reason::Draining, Reason::RunFinished, Reason::PodBound] {
            assert!(!r.is_warning(), "{r}");
        }
        for r in [Reason::HeartbeatLost, Reason::AwaitingApproval, Reason::NonZeroExit, Reason::OrphanPod] {
            assert!(r.is_warning(), "{r}");
        }
    }
}
