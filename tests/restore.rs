//! Never twice, across a disaster: a letter that was `queued` when the
//! backup was taken and sent afterwards must not go out a second time when
//! the backup is restored. The restored database holds sending until the
//! mailbox has been read completely once; the letter's acceptance (its
//! Message-ID names the dispatch) then marks it accepted.
//!
//! Dovecot must be installed (see tests/sandbox_support).

mod outbound_support;
#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::time::Duration;

use outbound_support::*;
use pecgate::pec::kind::Kind;
use sandbox_support::{Env, MARIO, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_does_not_send_again_what_left_after_it() {
    within(240, async {
        let env = Env::start(3600.0, None).await;
        let backup = env.tmp.path().join("backup");

        // 1. The provider cannot be reached: the letter stays queued.
        let mut gw = Gateway::start_full(
            &env,
            &[("PECGATE__MAILBOX__PROTOCOLLO__SMTP__PORT", "9")],
        )
        .await;
        drop_letter(
            &gw.outbox(),
            "dopo-il-backup.toml",
            &format!(
                "to = [\"{MARIO}\"]\nsubject = \"Inviata dopo il backup\"\nbody = \"Testo\"\nkind = \"avviso\"\n"
            ),
            &[],
        );
        let queued = gw
            .wait_list("the letter queued", Duration::from_secs(30), |l| {
                l.len() == 1 && l[0]["state"] == "queued"
            })
            .await;
        let id = queued[0]["dispatch_id"].as_str().unwrap().to_owned();
        gw.stop_cleanly().await;

        // 2. The nightly backup: the letter is queued in it.
        let out = gw.command(&["backup", backup.to_str().unwrap()]).await;
        assert!(out.status.success(), "backup: {out:?}");

        // 3. The provider is back: the letter leaves and is delivered.
        let mut gw = Gateway::start_full(&env, &[]).await;
        let delivered = gw
            .wait_list("the letter delivered", Duration::from_secs(60), |l| {
                l.len() == 1 && l[0]["state"] == "delivered"
            })
            .await;
        let sent_mid = delivered[0]["message_id"].as_str().unwrap().to_owned();
        gw.stop_cleanly().await;
        let boxes = mailboxes_exactly(&env, &[(MARIO, 1)]).await;
        assert_eq!(referring(&boxes[0], &Kind::Transport, &sent_mid).len(), 1);

        // 4. The machine is lost; the backup is restored.
        let out = gw
            .command(&["restore", "--force", backup.to_str().unwrap()])
            .await;
        assert!(out.status.success(), "restore: {out:?}");
        let list = gw.list(None).await;
        assert_eq!(list[0]["state"], "queued", "restored as it was: {list:?}");
        let held = |gw: &Gateway| {
            gw.db()
                .mailbox_state(MAILBOX)
                .unwrap()
                .and_then(|s| s.suspended_reason)
        };
        assert_eq!(
            held(&gw).as_deref(),
            Some(pecgate::store::HOLD_UNTIL_SYNC),
            "the restored database holds sending"
        );

        // 5. The daemon reads the mailbox before sending: the acceptance of
        // the attempt made after the backup settles the letter.
        let mut gw = Gateway::start_full(&env, &[]).await;
        let after = gw
            .wait_list("the restored letter settled", Duration::from_secs(60), |l| {
                l.len() == 1 && l[0]["state"] == "delivered"
            })
            .await;
        assert_eq!(after[0]["dispatch_id"], id.as_str());
        assert_eq!(held(&gw), None, "lifted after the first complete sync");
        assert_eq!(after[0]["message_id"], sent_mid.as_str(), "no new attempt");
        // Mario still has exactly one copy (mailboxes_exactly waits QUIET).
        let boxes = mailboxes_exactly(&env, &[(MARIO, 1)]).await;
        assert_eq!(boxes[0].len(), 1);
        let detail = gw.db().get(&id).unwrap().unwrap();
        assert!(
            detail.attempts.iter().all(|a| a.state != "sending"),
            "{:?}",
            detail.attempts
        );
        assert_eq!(
            detail
                .attempts
                .iter()
                .filter(|a| a.state == "submitted")
                .count(),
            1,
            "{:?}",
            detail.attempts
        );
        gw.stop_cleanly().await;
    })
    .await;
}
