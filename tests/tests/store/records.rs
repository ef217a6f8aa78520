//! Apps, app keys, webhooks, plugins and settings: create, read, update,
//! delete, pagination, and the conflicts the store names.

use std::collections::BTreeMap;

use wasmhook::domain::{AppId, CustomHeaders, KeyId, NewPlugin, PluginId, Upload, WebhookId};
use wasmhook::store::StoreError;

use crate::{Fixture, SECRET, attached, fields, filter, page};

#[tokio::test]
async fn apps_are_created_found_changed_and_deleted() {
    let f = Fixture::new().await;
    let app = f.store.create_app("Acme", Some("acme")).await.unwrap();
    assert!(app.id.as_str().starts_with("app_"));
    for key in [app.id.as_str(), "acme"] {
        let found = f.store.find_app(key).await.unwrap().expect("found");
        assert_eq!((found.id, found.name), (app.id.clone(), "Acme".to_owned()));
    }
    assert!(f.store.find_app("nobody").await.unwrap().is_none());

    let changed = f
        .store
        .update_app(&app.id, "Acme Corp", None)
        .await
        .unwrap();
    assert_eq!((changed.name.as_str(), changed.uid), ("Acme Corp", None));
    assert!(
        f.store.find_app("acme").await.unwrap().is_none(),
        "uid cleared"
    );

    f.store.delete_app(&app.id).await.unwrap();
    assert!(f.store.find_app(app.id.as_str()).await.unwrap().is_none());
    let again = f.store.delete_app(&app.id).await;
    assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
    let missing = f.store.update_app(&AppId::from("app_x"), "x", None).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
}

#[tokio::test]
async fn a_taken_uid_is_named_on_create_and_on_update() {
    let f = Fixture::new().await;
    f.store.create_app("One", Some("shared")).await.unwrap();
    let second = f.store.create_app("Two", Some("shared")).await;
    assert!(matches!(second, Err(StoreError::UidTaken)), "{second:?}");
    let other = f.store.create_app("Two", Some("other")).await.unwrap();
    let renamed = f.store.update_app(&other.id, "Two", Some("shared")).await;
    assert!(matches!(renamed, Err(StoreError::UidTaken)), "{renamed:?}");
}

#[tokio::test]
async fn app_keys_find_their_app_until_deleted() {
    let f = Fixture::new().await;
    let (app, other) = (f.app("A").await, f.app("B").await);
    let key = f.store.create_app_key(&app.id, "hash-a").await.unwrap();
    assert!(key.as_str().starts_with("key_"));
    let owner = f.store.app_for_key("hash-a").await.unwrap().expect("owner");
    assert_eq!(owner.id, app.id);
    assert!(f.store.app_for_key("hash-b").await.unwrap().is_none());

    let wrong_app = f.store.delete_app_key(&other.id, &key).await;
    assert!(
        matches!(wrong_app, Err(StoreError::NotFound)),
        "{wrong_app:?}"
    );
    f.store.delete_app_key(&app.id, &key).await.unwrap();
    assert!(f.store.app_for_key("hash-a").await.unwrap().is_none());
    let gone = f.store.delete_app_key(&app.id, &KeyId::from("key_x")).await;
    assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");
}

#[tokio::test]
async fn webhooks_keep_their_typed_settings() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let headers = BTreeMap::from([("X-Tenant".to_owned(), "acme".to_owned())]);
    let mut settings = fields("https://example.com/hooks");
    settings.event_types = filter(Some(&["invoice.*", "user.created"]));
    settings.headers = CustomHeaders::parse(&headers).unwrap();
    settings.description = "billing".into();
    settings.raw_payload = true;
    let created = f.webhook(&app, settings.clone()).await;
    assert!(created.id.as_str().starts_with("wh_"));

    let read = f
        .store
        .webhook(&app.id, &created.id)
        .await
        .unwrap()
        .expect("read");
    assert_eq!(read.event_types, settings.event_types);
    assert!(read.event_types.matches("invoice.paid"));
    assert_eq!(read.headers.as_map()["x-tenant"], "acme");
    assert_eq!(
        (read.url.as_str(), read.description.as_str()),
        ("https://example.com/hooks", "billing")
    );
    assert!(read.raw_payload && read.enabled && read.plugin.is_none());
    assert_eq!(read.secret, SECRET);

    let other = f.app("B").await;
    assert!(
        f.store
            .webhook(&other.id, &created.id)
            .await
            .unwrap()
            .is_none(),
        "another app's webhook"
    );
}

#[tokio::test]
async fn updating_a_webhook_replaces_its_fields_and_enabling_clears_the_reason() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = f.webhook(&app, fields("https://example.com/a")).await;
    let mut changed = fields("https://example.com/b");
    changed.enabled = false;
    changed.event_types = filter(Some(&["a.b"]));
    let updated = f
        .store
        .update_webhook(&app.id, &webhook.id, &changed)
        .await
        .unwrap();
    assert_eq!(
        (updated.url.as_str(), updated.enabled),
        ("https://example.com/b", false)
    );
    assert_eq!(updated.event_types, changed.event_types);
    assert!(updated.updated_at >= webhook.updated_at);

    changed.enabled = true;
    let enabled = f
        .store
        .update_webhook(&app.id, &webhook.id, &changed)
        .await
        .unwrap();
    assert!(enabled.enabled && enabled.disabled_reason.is_none());

    let missing = f
        .store
        .update_webhook(&app.id, &WebhookId::from("wh_x"), &changed)
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
}

#[tokio::test]
async fn rotating_a_secret_keeps_the_old_one_until_it_expires() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = f.webhook(&app, fields("https://example.com/a")).await;
    let next = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    f.store
        .rotate_secret(&app.id, &webhook.id, next, 12345)
        .await
        .unwrap();
    let read = f
        .store
        .webhook(&app.id, &webhook.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.secret, next);
    assert_eq!(read.previous_secret.as_deref(), Some(SECRET));
    assert_eq!(read.previous_secret_expires_at, Some(12345));
    let missing = f
        .store
        .rotate_secret(&app.id, &WebhookId::from("wh_x"), next, 1)
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
}

#[tokio::test]
async fn deleting_a_webhook_takes_its_deliveries() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = f.webhook(&app, fields("https://example.com/a")).await;
    let published = f.publish(&app, "a.b").await;
    assert_eq!(published.deliveries.len(), 1);
    f.store.delete_webhook(&app.id, &webhook.id).await.unwrap();
    assert!(
        f.store
            .webhook(&app.id, &webhook.id)
            .await
            .unwrap()
            .is_none()
    );
    let delivery = f
        .store
        .delivery(&app.id, &published.deliveries[0].id)
        .await
        .unwrap();
    assert!(delivery.is_none(), "the delivery went with its webhook");
    let again = f.store.delete_webhook(&app.id, &webhook.id).await;
    assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
}

#[tokio::test]
async fn lists_page_by_id_after_the_cursor() {
    let f = Fixture::new().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(f.app(&format!("app {i}")).await.id);
    }
    ids.sort();
    let first = f.store.list_apps(&page(None, 2)).await.unwrap();
    assert_eq!(
        first.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
        ids[..2]
    );
    let cursor = Some(first[1].id.to_string());
    let second = f.store.list_apps(&page(cursor, 10)).await.unwrap();
    assert_eq!(
        second.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
        ids[2..]
    );

    let app = f.app("hooks").await;
    for i in 0..3 {
        f.webhook(&app, fields(&format!("https://example.com/{i}")))
            .await;
    }
    let hooks = f
        .store
        .list_webhooks(&app.id, &page(None, 2))
        .await
        .unwrap();
    assert_eq!(hooks.len(), 2);
    assert!(hooks[0].id < hooks[1].id);
    let rest = f
        .store
        .list_webhooks(&app.id, &page(Some(hooks[1].id.to_string()), 10))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    let empty = f
        .store
        .list_webhooks(&ids[0], &page(None, 10))
        .await
        .unwrap();
    assert!(empty.is_empty(), "another app's webhooks are not listed");
}

fn upload(name: &str, version: &str, wasm: &[u8]) -> NewPlugin {
    NewPlugin {
        name: name.into(),
        version: version.into(),
        sha256: format!("sha-{}", String::from_utf8_lossy(wasm)),
        wasm: wasm.to_vec(),
    }
}

#[tokio::test]
async fn plugin_versions_are_immutable_and_uploads_repeat_safely() {
    let f = Fixture::new().await;
    let (plugin, made) = f
        .store
        .create_plugin(upload("redact", "1.0.0", b"one"))
        .await
        .unwrap();
    assert_eq!(made, Upload::Created);
    assert_eq!((plugin.size, plugin.sha256.as_str()), (3, "sha-one"));
    let (again, made) = f
        .store
        .create_plugin(upload("redact", "1.0.0", b"one"))
        .await
        .unwrap();
    assert_eq!((made, &again.id), (Upload::AlreadyStored, &plugin.id));
    let other = f
        .store
        .create_plugin(upload("redact", "1.0.0", b"two"))
        .await;
    match other {
        Err(StoreError::PluginVersionExists { name, version }) => {
            assert_eq!((name.as_str(), version.as_str()), ("redact", "1.0.0"))
        }
        other => panic!("{other:?}"),
    }
    f.store
        .create_plugin(upload("redact", "1.0.1", b"two"))
        .await
        .unwrap();
    let listed = f.store.list_plugins(&page(None, 10)).await.unwrap();
    assert_eq!(listed.len(), 2);

    let code = f
        .store
        .plugin_code(&plugin.id)
        .await
        .unwrap()
        .expect("code");
    assert_eq!((code.wasm.as_slice(), code.artifact), (&b"one"[..], None));
    f.store
        .set_plugin_artifact("sha-one", b"machine code".to_vec(), "key-1")
        .await
        .unwrap();
    let code = f
        .store
        .plugin_code(&plugin.id)
        .await
        .unwrap()
        .expect("code");
    assert_eq!(code.artifact.as_deref(), Some(&b"machine code"[..]));
    assert_eq!(code.artifact_key.as_deref(), Some("key-1"));
    assert!(
        f.store
            .plugin(&PluginId::from("plg_x"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_plugin_in_use_cannot_be_deleted_and_a_missing_one_cannot_be_attached() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let (plugin, _) = f.store.create_plugin(upload("p", "1", b"x")).await.unwrap();
    let mut with_plugin = fields("https://example.com/a");
    with_plugin.plugin = Some(attached(&plugin.id, r#"{"keep":1}"#));
    let webhook = f.webhook(&app, with_plugin.clone()).await;
    assert_eq!(webhook.plugin, with_plugin.plugin);

    let refused = f.store.delete_plugin(&plugin.id).await;
    assert!(
        matches!(refused, Err(StoreError::PluginInUse { webhooks: 1 })),
        "{refused:?}"
    );
    let mut detached = with_plugin.clone();
    detached.plugin = None;
    f.store
        .update_webhook(&app.id, &webhook.id, &detached)
        .await
        .unwrap();
    f.store.delete_plugin(&plugin.id).await.unwrap();
    assert!(f.store.plugin(&plugin.id).await.unwrap().is_none());
    let gone = f.store.delete_plugin(&plugin.id).await;
    assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");

    let attach_missing = f.store.create_webhook(&app.id, &with_plugin, SECRET).await;
    assert!(
        matches!(attach_missing, Err(StoreError::PluginMissing)),
        "{attach_missing:?}"
    );
    let update_missing = f
        .store
        .update_webhook(&app.id, &webhook.id, &with_plugin)
        .await;
    assert!(
        matches!(update_missing, Err(StoreError::PluginMissing)),
        "{update_missing:?}"
    );
}

#[tokio::test]
async fn a_setting_is_written_once() {
    let f = Fixture::new().await;
    assert_eq!(f.store.setting("k").await.unwrap(), None);
    assert_eq!(
        f.store
            .setting_insert_if_absent("k", "first")
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        f.store
            .setting_insert_if_absent("k", "second")
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        f.store.setting("k").await.unwrap().as_deref(),
        Some("first")
    );
}
