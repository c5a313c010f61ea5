"""The console's forms: shape checks only; the rules live in the services they feed."""

from __future__ import annotations

from django import forms

#: The scope sets a console user may put on a new key (services check each against
#: the member's role, as for a key created through the API).
KEY_SCOPES = (
    ("all", "All (everything your role allows)"),
    ("read_only", "Read only"),
    ("inference", "Inference only"),
)


class SignupForm(forms.Form):
    email = forms.EmailField(max_length=254)
    password = forms.CharField(
        max_length=256,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="At least 10 characters, not a common password.",
    )
    organization_name = forms.CharField(label="Organization name", max_length=200)


class LoginForm(forms.Form):
    email = forms.EmailField(
        max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email"})
    )
    password = forms.CharField(
        max_length=256,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )


class KeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    scopes = forms.ChoiceField(choices=KEY_SCOPES, initial="all")
