"""Query/positive pairs (the `pairs` file format) shared by the evaluation tests: twelve
customer-support questions, each with the one answer that fits it."""

PAIRS = [
    ("how do I reset my password", "Open settings, choose security and press reset password."),
    ("where is my parcel", "Your parcel left the depot and arrives tomorrow."),
    ("can I pay with a credit card", "We accept Visa, Mastercard and American Express."),
    ("what are your opening hours", "The shop is open from nine to five on weekdays."),
    ("how do I cancel my subscription", "Cancel any time from the billing page of your account."),
    ("is there a student discount", "Students get twenty percent off with a valid card."),
    ("do you ship abroad", "We deliver to forty countries; see the shipping page."),
    ("my screen is cracked", "Screen repairs take two days at any service point."),
    ("the app keeps crashing", "Update the app and restart the phone to stop the crashes."),
    ("how do I change my email", "Your email address can be changed in the profile tab."),
    ("can I return a gift", "Gifts can be returned within sixty days with the receipt."),
    ("what is the warranty", "Every device has a two year warranty against defects."),
]
