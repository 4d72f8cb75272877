//! `convoyctl reshard`: moves a slot range to a shard online (adding the shard first when
//! asked) through the shard-router, following the move until it ends.

use std::time::Duration;

use crate::access::Access;
use convoy_discovery::EtcdConfig;
use convoy_proto::v1 as pb;

use crate::shards::router;

/// What to move where.
#[derive(Clone, Debug)]
pub struct Reshard {
    /// First slot.
    pub start: u16,
    /// Last slot, inclusive.
    pub end: u16,
    /// The receiving shard.
    pub to: String,
    /// Add the shard first, with this primary `host:port`.
    pub add_primary: Option<String>,
    /// The new shard's replicas' `host:port`s.
    pub add_replicas: Vec<String>,
}

/// Starts the move (adding the shard if asked) and polls it until it ends, calling
/// `progress` with each state seen; returns the final state. The router is reached with
/// `access`.
pub async fn reshard(
    etcd: &EtcdConfig,
    access: &Access,
    plan: &Reshard,
    mut progress: impl FnMut(&pb::Operation),
) -> anyhow::Result<pb::Operation> {
    let mut client = router(etcd, access);
    if let Some(primary) = &plan.add_primary {
        client
            .add_shard(pb::AddShardRequest {
                shard_id: plan.to.clone(),
                primary_address: primary.clone(),
                replica_addresses: plan.add_replicas.clone(),
            })
            .await?;
    }
    let mut op = client
        .move_slots(pb::MoveSlotsRequest {
            start: i32::from(plan.start),
            end: i32::from(plan.end),
            to_shard: plan.to.clone(),
            request_id: uuid::Uuid::now_v7().to_string(),
        })
        .await?
        .into_inner();
    loop {
        progress(&op);
        if op.done {
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A router restarting mid-move answers UNAVAILABLE for a moment: keep polling.
        if let Ok(next) = client
            .get_operation(pb::GetOperationRequest {
                name: op.name.clone(),
            })
            .await
        {
            op = next.into_inner();
        }
    }
}

/// A phase as operators read it.
pub fn phase(op: &pb::Operation) -> &'static str {
    use pb::operation::Phase;
    match Phase::try_from(op.phase).unwrap_or(Phase::Unspecified) {
        Phase::Unspecified => "unknown",
        Phase::Pending => "pending",
        Phase::Copying => "copying",
        Phase::CatchingUp => "catching up",
        Phase::CuttingOver => "cutting over",
        Phase::CleaningUp => "cleaning up",
        Phase::Done => "done",
        Phase::Cancelled => "cancelled",
        Phase::Failed => "failed",
    }
}

/// The closing line: how it ended and how long writes paused.
pub fn summary(op: &pb::Operation) -> String {
    let pause = op
        .write_pause
        .as_ref()
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32));
    match (phase(op), pause) {
        ("done", Some(pause)) => format!(
            "{}: done, {} rows copied, writes to the range paused {:.1} ms",
            op.name,
            op.rows_copied,
            pause.as_secs_f64() * 1000.0
        ),
        ("failed", _) => format!("{}: failed: {}", op.name, op.error),
        (phase, _) => format!("{}: {phase}", op.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reports_the_write_pause() {
        let op = pb::Operation {
            name: "operations/x".into(),
            phase: pb::operation::Phase::Done as i32,
            rows_copied: 42,
            write_pause: Some(prost_types::Duration {
                seconds: 0,
                nanos: 12_500_000,
            }),
            done: true,
            ..Default::default()
        };
        assert_eq!(
            summary(&op),
            "operations/x: done, 42 rows copied, writes to the range paused 12.5 ms"
        );
        let failed = pb::Operation {
            phase: pb::operation::Phase::Failed as i32,
            error: "slots 0-600 are not owned by one shard".into(),
            ..op
        };
        assert!(summary(&failed).ends_with("failed: slots 0-600 are not owned by one shard"));
    }
}
