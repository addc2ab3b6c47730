//! Errors a real server sends, sorted by `pg::classify` as the daemon's retries see them.

mod support;

use std::time::Duration;

use pgtide::pg::{self, Retry};
use support::{wait_for, Env};

/// Regression: a statement timeout (57014) was retried forever as transient.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_timeout_is_permanent() {
    let env = Env::new().await;
    let e = env
        .dwh
        .batch_execute("set statement_timeout = 1; select pg_sleep(1)")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e:?}");
    assert_eq!(pg::classify(&e), Retry::Permanent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_session_is_transient() {
    let env = Env::new().await;
    let victim = support::connect(&env.dwh_url).await;
    let pid: i32 = victim
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sleeping = tokio::spawn(async move { victim.batch_execute("select pg_sleep(60)").await });
    let dwh = &env.dwh;
    wait_for(30, "the victim's pg_sleep to start", || async move {
        dwh.query_one(
            "select count(*) from pg_stat_activity where pid = $1 and wait_event = 'PgSleep'",
            &[&pid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    let ended: bool = env
        .dwh
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    let e = tokio::time::timeout(Duration::from_secs(30), sleeping)
        .await
        .expect("the terminated session's statement did not end")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e:?}");
    assert_eq!(pg::classify(&e), Retry::Transient);
}
