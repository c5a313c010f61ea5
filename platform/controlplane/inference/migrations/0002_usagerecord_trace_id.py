from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="usagerecord",
            name="trace_id",
            field=models.CharField(blank=True, db_index=True, default="", max_length=200),
        ),
    ]
