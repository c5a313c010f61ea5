from django.urls import path

from . import views

app_name = "console"

urlpatterns = [
    path("", views.overview_view, name="overview"),
    path("signup/", views.signup_view, name="signup"),
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("keys/", views.keys_view, name="keys"),
    path("keys/<str:key_id>/revoke", views.key_revoke_view, name="key-revoke"),
    path("keys/<str:key_id>/rotate", views.key_rotate_view, name="key-rotate"),
    path("usage/", views.usage_view, name="usage"),
]
